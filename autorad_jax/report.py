"""A picture per predicted nodule, and one HTML page showing them all (`run.py predict --report DIR`).

Each picture shows the three views the model was given (lung window; the crop's patient LPS axes named by orientation
letters at each side: R/L, A/P, I/S) with the consensus-mask contour, a saliency
map over each view (|d logit of the predicted class / d input pixel|, by jax.grad), the class probabilities, and the
radiomic features with the largest gradient × input attribution on the standardised radiomics (which reach the
prompts through the meta-network's context shift), each with its value against the training mean ± std.
Saliency and attributions are always computed by the JAX model (an export's is loaded with export.load_export);
the probabilities are the backend's that ran.
"""

from __future__ import annotations

import dataclasses
import html
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from autorad_jax.data import pipeline, preprocess
from autorad_jax.predictor import NoduleInputs, Predictor
from tfds_lidc import orientation

TOP_FEATURES = 8
FIGSIZE, DPI = (13.0, 7.5), 100  # 1300 x 750 pixels
VIEW_NAMES = {"2.5d": ("axial, slice −1", "axial, centre slice", "axial, slice +1"),
              "planes": ("axial", "coronal", "sagittal")}
# The (z, y, x) crop axes along each view's rows and columns (autorad_jax.data.pipeline.extract_view).
VIEW_AXES = {"2.5d": ((1, 2),) * 3, "planes": ((1, 2), (0, 2), (0, 1))}


@dataclasses.dataclass
class Explanation:
    """Where the model looked and which radiomic features moved its prompts, for one nodule."""
    probabilities: np.ndarray  # [C], of the JAX model
    predicted: int
    saliency: np.ndarray  # [H, W, 3]: |gradient| of the predicted class's logit per input pixel and view
    attributions: np.ndarray  # [F]: gradient x input on the standardised radiomics


def explainer(model) -> Any:
    """A jitted function (image [H, W, 3], standardised radiomics [F]) -> ((predicted logit, logits [C]),
    (d image, d radiomics)) of the predicted class's logit."""
    def predicted_logit(image, radiomics):
        logits, _ = model(image[None], radiomics[None])
        logits = logits[0].astype(jnp.float32)
        return logits[jnp.argmax(jax.lax.stop_gradient(logits))], logits

    grad = jax.value_and_grad(predicted_logit, argnums=(0, 1), has_aux=True)
    return jax.jit(grad)


def explain(explain_fn, image: np.ndarray, radiomics_z: np.ndarray) -> Explanation:
    """The Explanation of one nodule's normalised view and standardised radiomics."""
    (_, logits), (d_image, d_radiomics) = explain_fn(jnp.asarray(image), jnp.asarray(radiomics_z))
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max())
    return Explanation(probabilities=probs / probs.sum(), predicted=int(np.argmax(logits)),
                       saliency=np.abs(np.asarray(d_image, np.float32)),
                       attributions=np.asarray(d_radiomics, np.float32) * np.asarray(radiomics_z, np.float32))


def jax_model(predictor: Predictor):
    """The predictor's JAX model, or its export's loaded with export.load_export (the torch backend keeps none)."""
    if predictor.jax_model is not None:
        return predictor.jax_model
    from autorad_jax import export
    return export.load_export(predictor.source["export"])[0]


def top_features(attributions: np.ndarray, k: int = TOP_FEATURES) -> np.ndarray:
    """Indices of the k largest |attributions|, largest first."""
    return np.argsort(-np.abs(attributions), kind="stable")[:k]


def _picture(path: str, predictor: Predictor, inputs: NoduleInputs, nodule: dict, exp: Explanation,
             title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    view = predictor.data_config.view
    size = predictor.data_config.image_size
    ct = np.asarray(preprocess.window(inputs.view, tuple(predictor.data_config.window_hu)))
    mask = pipeline.extract_view(inputs.sample.mask.astype(np.float32), view)
    names = VIEW_NAMES.get(view, ("view 1", "view 2", "view 3"))
    fig = plt.figure(figsize=FIGSIZE, dpi=DPI)
    grid = fig.add_gridspec(2, 5, width_ratios=[1, 1, 1, 0.75, 1.6])
    extent = (0, size, size, 0)  # crop and saliency on the model's input grid
    for i in range(3):
        for row, overlay in ((0, None), (1, exp.saliency[..., i])):
            ax = fig.add_subplot(grid[row, i])
            ax.imshow(ct[..., i], cmap="gray", vmin=0, vmax=1, extent=extent)
            if overlay is not None:
                ax.imshow(overlay, cmap="inferno", alpha=0.6, extent=extent)
            if mask[..., i].any():
                ax.contour(np.linspace(0, size, mask.shape[1]), np.linspace(0, size, mask.shape[0]), mask[..., i],
                           levels=[0.5], colors="lime", linewidths=1)
            ax.set_title(names[i] if row == 0 else f"saliency, {names[i]}", fontsize=9)
            _orientation_letters(ax, *VIEW_AXES[view][i])
            ax.axis("off")
    ax = fig.add_subplot(grid[0, 4])
    labels = list(nodule["probabilities"])
    ax.barh(labels, list(nodule["probabilities"].values()), color=["C2", "C1", "C3"][:len(labels)])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_title(f"probabilities ({predictor.source['backend']} backend): {nodule['label']}", fontsize=10)
    ax = fig.add_subplot(grid[1, 4])
    top = top_features(exp.attributions)
    stats = predictor.stats
    raw = inputs.sample.radiomics
    ax.barh([f"{predictor.feature_names[j].removeprefix('original_')}\n{raw[j]:.3g} (train {stats.mean[j]:.3g} ± "
             f"{stats.std[j]:.3g})" for j in top], exp.attributions[top],
            color=["C3" if a > 0 else "C0" for a in exp.attributions[top]])
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"radiomics: gradient × input\non the '{nodule['label']}' logit", fontsize=10)
    fig.suptitle(f"{title}: {nodule['label']} — diameter {nodule['diameter_mm']:.1f} mm, centroid "
                 f"{', '.join(f'{v:.1f}' for v in nodule['centroid_mm'])} mm", fontsize=11)
    fig.text(0.01, 0.01, f"Probabilities by the {predictor.source['backend']} backend; saliency (|∂ logit / ∂ pixel|) "
             f"and attributions by the JAX model" + (", loaded from the export with export.load_export"
                                                     if "export" in predictor.source else "")
             + ". Green: the nodule mask. Research use only.", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.07, wspace=0.3, hspace=0.25)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _orientation_letters(ax, row_axis: int, column_axis: int) -> None:
    """The patient direction at each side of a picture of the crop (radiology's R/L, A/P, I/S letters)."""
    top, bottom, left, right = orientation.view_letters(row_axis, column_axis)
    style = dict(transform=ax.transAxes, color="yellow", fontsize=8, fontweight="bold")
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)


def write_reports(predictor: Predictor, inputs: Sequence[NoduleInputs], nodules: Sequence[dict], report_dir: str,
                  titles: Sequence[str]) -> dict[str, Any]:
    """Writes report_dir/nodule_<i>.png per nodule and report_dir/index.html; returns their paths and, per nodule,
    the top radiomic features with their attributions."""
    os.makedirs(report_dir, exist_ok=True)
    explain_fn = explainer(jax_model(predictor))
    pictures, features, sections = [], [], []
    for i, (x, nodule, title) in enumerate(zip(inputs, nodules, titles)):
        image = preprocess.images(x.view[None], preprocess.Preprocessing.from_config(predictor.data_config))[0]
        exp = explain(explain_fn, image, predictor.stats.apply(x.sample.radiomics))
        name = f"nodule_{i:03d}.png"
        _picture(os.path.join(report_dir, name), predictor, x, nodule, exp, title)
        pictures.append(os.path.abspath(os.path.join(report_dir, name)))
        features.append({predictor.feature_names[j]: float(exp.attributions[j]) for j in top_features(exp.attributions)})
        probs = ", ".join(f"{k} {v:.3f}" for k, v in nodule["probabilities"].items())
        sections.append(f"<h2>{html.escape(title)} — {html.escape(nodule['label'])}</h2>\n<p>{html.escape(probs)}; "
                        f"{html.escape(nodule.get('mask', ''))}</p>\n<img src=\"{name}\" width=\"100%\">")
    page = os.path.join(report_dir, "index.html")
    with open(page, "w") as f:
        f.write("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>autorad-jax nodule reports</title></head>"
                "<body>\n" + "\n".join(sections) + "\n</body></html>\n")
    return {"html": os.path.abspath(page), "pictures": pictures, "top_radiomics": features}
