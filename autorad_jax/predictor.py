"""A trained model as predict uses it: loaded from a workdir or an export folder, run by JAX or PyTorch, and applied to
one nodule's crop and radiomics (the dataset builder's own code, then the training pipeline's own per-example inputs).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Callable, Optional

import numpy as np
import SimpleITK as sitk

from autorad_jax.data import pipeline
from autorad_jax.errors import PredictInputError
from tfds_lidc import nodule_sample, radiomics_features

BACKENDS = ("jax", "torch")


@dataclasses.dataclass
class Predictor:
    """What predict needs of a trained model: its preprocessing, radiomics statistics and a probability function."""
    data_config: Any  # ml_collections.ConfigDict of config.data
    stats: pipeline.RadiomicsStats
    feature_names: list[str]
    labels: list[str]
    class_names: list[str]
    preprocessing: dict[str, Any]
    probabilities: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (view [S,S,3] HU, raw radiomics [F]) -> [C]
    source: dict[str, Any]
    jax_model: Any = None  # the JAX model, where one was loaded (for saliency; see autorad_jax.report)


def _jax_probabilities(model, stats: pipeline.RadiomicsStats, data_config) -> Callable:
    """Probabilities by `model`, preprocessing included, compiled once (an eager first call compiles every operation
    on its own: several times slower)."""
    import jax
    from flax import nnx
    from autorad_jax.data import preprocess
    prep = preprocess.Preprocessing.from_config(data_config)
    graphdef, state = nnx.split(model)

    @jax.jit  # the weights are an argument, not constants of the program
    def probabilities(state: nnx.State, views: jax.Array, radiomics: jax.Array) -> jax.Array:
        logits, _ = nnx.merge(graphdef, state)(preprocess.model_inputs(views, prep), radiomics,
                                               image_size=prep.image_size)
        return jax.nn.softmax(logits.astype(jax.numpy.float32), axis=-1)

    def run(view: np.ndarray, radiomics: np.ndarray) -> np.ndarray:
        return np.asarray(probabilities(state, view[None], stats.apply(radiomics)[None]))[0]
    return run


def _torch_probabilities(export_dir: str) -> Callable:
    import torch
    from autorad_jax.weights.torch_model import AutoRadLungTorch
    model = AutoRadLungTorch.from_export(export_dir).eval()

    def run(view: np.ndarray, radiomics: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            pixels = model.preprocess(torch.from_numpy(np.ascontiguousarray(view)[None]))
            logits = model(pixels, torch.from_numpy(np.asarray(radiomics, np.float32)[None]))
        return logits.softmax(-1)[0].numpy()
    return run


def check_model_source(workdir: Optional[str], export_dir: Optional[str]) -> None:
    """PredictInputError unless exactly one of a workdir and an export folder is given; a workdir must hold
    checkpoints (said before a CT is read)."""
    if (workdir is None) == (export_dir is None):
        raise PredictInputError("give either a workdir (--workdir) or an export folder (--export), not both.")
    if workdir is not None:
        from autorad_jax.train import checkpointing
        checkpointing.require_checkpoint_dir(workdir)


def load_predictor(*, workdir: Optional[str] = None, export_dir: Optional[str] = None,
                   backend: str = "jax") -> Predictor:
    """The model of `workdir` (best checkpoint) or of `export_dir`, run by `backend` ('jax' | 'torch'). JAX keeps its
    compiled programs in the folder's compilation_cache/ when the folder is writable (see train/compilation_cache.py),
    so that the next prediction with the same model reads them instead of compiling.

    Only the workdir or the export folder is read (not the dataset, nor the pretrained folder the run started from).
    A workdir with the torch backend is exported to a temporary folder first (AutoRad-Lung and CoOp only).
    """
    from autorad_jax.data import preprocess
    from autorad_jax.train import checkpointing, compilation_cache, experiment
    if backend not in BACKENDS:
        raise PredictInputError(f"backend {backend!r}; use one of {BACKENDS}.")
    check_model_source(workdir, export_dir)
    folder = workdir or export_dir
    if backend == "jax":  # the forward pass compiled by an earlier prediction with this model is read back
        compilation_cache.use_workdir_cache(os.access(folder, os.W_OK), folder, every_program=True)
    if workdir is not None:
        restored = experiment.load_model(workdir)
        config = restored.config
        if backend == "torch":  # export_model refuses the baselines before writing anything
            from autorad_jax import export
            with tempfile.TemporaryDirectory(prefix="autorad_export_") as tmp:  # the torch model is read into memory
                run = _torch_probabilities(export.export_model(
                    restored.model, config, restored.spec, restored.stats, tmp,
                    tokenizer_dir=os.path.join(workdir, export.TOKENIZER_DIR)))
        else:
            run = _jax_probabilities(restored.model, restored.stats, config.data)
        return Predictor(jax_model=restored.model,
            data_config=config.data, stats=restored.stats, feature_names=list(restored.spec.radiomics_names),
            labels=list(pipeline.label_names(config.data.label_scheme)), class_names=list(restored.spec.class_names),
            preprocessing=preprocess.description(config.data), probabilities=run,
            source={"workdir": os.path.abspath(workdir), "step": restored.step, "model": config.model.name,
                    "backend": backend})
    from autorad_jax import export
    from autorad_jax.weights.export_format import read_export_config
    export_config = read_export_config(export_dir)
    stats = pipeline.RadiomicsStats.from_json(export_config["radiomics"])
    data_config = checkpointing.saved_config(export_config["config"]).data
    jax_model = None if backend == "torch" else export.load_export(export_dir)[0]
    run = (_torch_probabilities(export_dir) if backend == "torch"
           else _jax_probabilities(jax_model, stats, data_config))
    return Predictor(jax_model=jax_model,
        data_config=data_config, stats=stats,
        feature_names=list(export_config["radiomics"]["feature_names"]), labels=list(export_config["labels"]),
        class_names=list(export_config["class_names"]), preprocessing=export_config["preprocessing"],
        probabilities=run, source={"export": os.path.abspath(export_dir), "model": export_config["model"]["name"],
                                   "backend": backend, **export_config.get("checkpoint", {})})


def _builder_params(preprocessing: dict[str, Any]) -> str:
    return pipeline.builder_config(preprocessing["builder_config"]).radiomics_params


@dataclasses.dataclass
class NoduleInputs:
    """One nodule as the model sees it: the builder's sample (crop, mask, radiomics) and its HU view."""
    sample: nodule_sample.NoduleSample
    view: np.ndarray  # [S, S, 3] int16 HU; autorad_jax.data.preprocess makes the model's image of it


def nodule_inputs(predictor: Predictor, ct: sitk.Image, mask: sitk.Image) -> NoduleInputs:
    """The nodule's crop and radiomics (by the dataset builder's own function) and its model input view."""
    prep = predictor.preprocessing
    params = _builder_params(prep)
    names = list(radiomics_features.feature_names(params))
    if names != predictor.feature_names:
        raise PredictInputError(f"this installation computes {len(names)} radiomics features "
                                f"({params}) but the model was trained on {len(predictor.feature_names)} different "
                                f"ones; use the radiomics parameters the model was trained with.")
    try:
        sample = nodule_sample.nodule_example(ct, mask, crop_size=int(prep["crop_size"]),
                                              spacing_mm=float(prep["spacing_mm"]), radiomics_params=params)
    except ValueError as e:
        raise PredictInputError(f"the nodule cannot be measured: {e}") from e
    inputs = pipeline.example_to_inputs({"ct": sample.ct, "radiomics": sample.radiomics}, predictor.data_config,
                                        predictor.stats)
    return NoduleInputs(sample, inputs["view"])


def score_nodule(predictor: Predictor, inputs: NoduleInputs) -> dict[str, Any]:
    """Probabilities and measurements of one nodule."""
    sample = inputs.sample
    probs = predictor.probabilities(inputs.view, sample.radiomics)
    return {
        "probabilities": {label: float(p) for label, p in zip(predictor.labels, probs)},
        "label": predictor.labels[int(np.argmax(probs))],
        "centroid_mm": [float(v) for v in sample.centroid_mm],
        "diameter_mm": float(sample.diameter_mm),
        "volume_mm3": float(sample.volume_mm3),
        "crop_reaches_outside_scan": bool(sample.padded),
        "radiomics": {n: float(v) for n, v in zip(predictor.feature_names, sample.radiomics)},
    }

