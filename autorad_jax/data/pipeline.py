"""Input pipeline: lidc_idri records -> model inputs, with grain over `tfds.data_source` (no TensorFlow).

One example dict (as stored by the builder) becomes model inputs through `example_to_inputs`; training, evaluation,
prediction and export all use that one function. The stored 3D crop gives the 2D view the model sees:
  '2.5d'    the centre axial slice with the slices above and below as three channels;
  'planes'  the axial, coronal and sagittal slices through the centre.
The host ships each view as the stored int16 HU slices; windowing, augmentation, resizing and normalisation run on
the devices inside the jitted steps (`autorad_jax.data.preprocess`). Each split is read once through
`tfds.data_source` (labels, folds, radiomics and the view, a few KB per nodule, kept in memory); grain then shards,
shuffles and batches from memory. Radiomics are standardised with the training split's statistics
(`RadiomicsStats`), which are saved with every checkpoint and reused wherever the model runs.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from collections.abc import Iterator

import grain.python as grain
import jax
import ml_collections
import numpy as np

from autorad_jax.data import labels as labels_lib
from autorad_jax.errors import AutoradError, ConfigError

STORED_CLASSES = ("benign", "unsure", "malignant")  # the dataset's ClassLabel names, in label order
# Each scheme keeps some stored classes, in this order.
SCHEME_CLASSES = {"3class": (0, 1, 2), "binary": (0, 2)}
SPLITS = ("train", "validation", "test")


class DatasetError(AutoradError, RuntimeError):
    """The dataset is missing or does not match the config; the message says what to run."""


# ------------------------------------------------------------------------------------------------------------------
# One example -> model inputs.
# ------------------------------------------------------------------------------------------------------------------

def scheme_classes(label_scheme: str) -> tuple[int, ...]:
    """Stored class ids kept by `label_scheme`, in model-output order."""
    if label_scheme not in SCHEME_CLASSES:
        raise ConfigError(f"config.data.label_scheme={label_scheme!r}; use one of {sorted(SCHEME_CLASSES)}.")
    return SCHEME_CLASSES[label_scheme]


def label_names(label_scheme: str) -> tuple[str, ...]:
    """Short names of the scheme's classes (as stored in the dataset), for metrics and reports."""
    return tuple(STORED_CLASSES[i] for i in scheme_classes(label_scheme))


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The model's class names for the config's label scheme (binary: the first and last)."""
    return tuple(config.model.class_names[i] for i in scheme_classes(config.data.label_scheme))


def extract_view(ct: np.ndarray, view: str) -> np.ndarray:
    """[S, S, S] (z, y, x) crop -> [S, S, 3] view through its centre (see the module docstring)."""
    c = ct.shape[0] // 2
    if view == "2.5d":
        return np.stack([ct[c - 1], ct[c], ct[c + 1]], axis=-1)
    if view == "planes":
        return np.stack([ct[c, :, :], ct[:, c, :], ct[:, :, c]], axis=-1)
    raise ConfigError(f"config.data.view={view!r}; use '2.5d' or 'planes'.")


@dataclasses.dataclass(frozen=True)
class RadiomicsStats:
    """Per-feature mean and standard deviation of the training split's radiomics."""
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, radiomics: np.ndarray) -> RadiomicsStats:
        """Statistics of an [N, F] feature matrix (a constant feature gets std 1, so it standardises to 0)."""
        x = np.asarray(radiomics, np.float64)
        std = x.std(axis=0)
        return cls(mean=x.mean(axis=0).astype(np.float32), std=np.where(std > 1e-12, std, 1.0).astype(np.float32))

    def apply(self, radiomics: np.ndarray) -> np.ndarray:
        """Standardised features; non-finite inputs become 0 (the training mean)."""
        z = (np.asarray(radiomics, np.float32) - self.mean) / self.std
        return np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)

    def to_json(self) -> dict:
        """{'mean': [...], 'std': [...]}, as saved with every checkpoint."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> RadiomicsStats:
        """The inverse of `to_json`."""
        return cls(mean=np.asarray(d["mean"], np.float32), std=np.asarray(d["std"], np.float32))


def scheme_label(stored_label: int, label_scheme: str) -> int:
    """Index of a stored label among the scheme's classes (-1: not in the scheme, e.g. unsure under 'binary')."""
    classes = scheme_classes(label_scheme)
    return classes.index(int(stored_label)) if int(stored_label) in classes else -1


def example_to_inputs(example: dict, data_config: ml_collections.ConfigDict,
                      stats: RadiomicsStats) -> dict[str, np.ndarray]:
    """One stored example -> {'view' [S, S, 3] int16 HU, 'radiomics' [F] standardised, 'label' (when it has one)}.

    The one path from a nodule crop to model inputs (training, evaluation, prediction and export all use it);
    `preprocess.images` turns views into images.
    """
    out = {"view": extract_view(np.asarray(example["ct"]), data_config.view).astype(np.int16),
           "radiomics": stats.apply(example["radiomics"])}
    if "label" in example:
        out["label"] = np.int32(scheme_label(example["label"], data_config.label_scheme))
    return out


# ------------------------------------------------------------------------------------------------------------------
# Records: the split (or cross-validation fold) a role reads, with its labels and radiomics.
# ------------------------------------------------------------------------------------------------------------------

CV_FOLDS = 5  # folds of the stored train + validation patients (tfds_lidc.splits.NUM_FOLDS)

def dataset_name(data_config: ml_collections.ConfigDict) -> str:
    """The tfds name of the configured dataset, '<name>/<builder_config>'."""
    return f"{data_config.name}/{data_config.builder_config}"


def _prepare_hint(data_config: ml_collections.ConfigDict) -> str:
    return (f"Build it with `python run.py prepare --manual_dir=/path/to/LIDC-IDRI "
            f"--builder_config={data_config.builder_config} --data_dir={data_config.data_dir}`, or for demo data "
            f"`python run.py synth --out=workdir/lidc_demo` and then prepare with --manual_dir=workdir/lidc_demo.")


def _build_stamp(name: str, data_dir: str) -> tuple[int, ...]:
    """When the dataset's versions were last written: part of the cache keys below, so that a dataset rebuilt at the
    same path within one process is read anew."""
    infos = glob.glob(os.path.join(data_dir, *name.split("/"), "*", "dataset_info.json"))
    return tuple(sorted(os.stat(f).st_mtime_ns for f in infos))


@functools.lru_cache(maxsize=8)
def _open_split(name: str, data_dir: str, split: str, stamp: tuple[int, ...]):
    del stamp  # a cache key only
    import tensorflow_datasets as tfds
    import tfds_lidc  # noqa: F401  (registers the builder)
    return tfds.data_source(name, data_dir=data_dir, split=split, download=False)


@functools.lru_cache(maxsize=8)
def _empty_splits(name: str, data_dir: str) -> dict[str, str]:
    """{split: why} of the splits the builder left out because no example fell in them ({} if unknown)."""
    import tensorflow_datasets as tfds
    import tfds_lidc  # noqa: F401  (registers the builder)
    try:
        return dict(tfds.builder(name, data_dir=data_dir).info.metadata.get("empty_splits", {}))
    except Exception:  # noqa: BLE001  (no dataset: open_split says so)
        return {}


def open_split(data_config: ml_collections.ConfigDict, split: str):
    """The random-access source of one stored split; a DatasetError saying what to run if it is not there."""
    name = dataset_name(data_config)
    why = _empty_splits(name, str(data_config.data_dir)).get(split)
    if why is not None:
        raise DatasetError(f"Dataset {name} in {data_config.data_dir} has no {split!r} split ({why}): prepare it "
                           f"from more patients, or train with --config.data.cv_fold=0..4 (train and validation drawn "
                           f"from the folds of the splits it has; no test).")
    try:
        source = _open_split(name, str(data_config.data_dir), split, _build_stamp(name, str(data_config.data_dir)))
    except Exception as e:  # tfds raises several types for a missing dataset / config / split.
        raise DatasetError(f"Dataset {name} split {split!r} not found in {data_config.data_dir} "
                           f"({type(e).__name__}: {e}). {_prepare_hint(data_config)}") from e
    if len(source) == 0:
        raise DatasetError(f"Dataset {name} split {split!r} in {data_config.data_dir} is empty. "
                           f"{_prepare_hint(data_config)}")
    return source


def builder_config(name: str):
    """The lidc_idri builder config called `name` (crop size, spacing, consensus level, radiomics parameters)."""
    import tfds_lidc
    configs = {c.name: c for c in tfds_lidc.Builder.BUILDER_CONFIGS}
    if name not in configs:
        raise ConfigError(f"config.data.builder_config={name!r} is not one of {sorted(configs)}")
    return configs[name]


def radiomics_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The ordered pyradiomics feature names of the configured dataset (its metadata)."""
    info = open_split(data_config, "train").dataset_info
    return tuple(info.metadata["radiomics_feature_names"])


@dataclasses.dataclass
class Records:
    """The examples a role reads, in memory: the HU view of each crop (the first step of `example_to_inputs`), its
    raw radiomics, its scheme label, patient and diameter. A grain random-access source of {'view', 'radiomics',
    'label'}."""
    views: np.ndarray  # [N, S, S, 3] int16 HU
    radiomics: np.ndarray  # [N, F] float32, raw
    labels: np.ndarray  # [N] int32, index in the label scheme's classes
    patients: np.ndarray | None = None  # [N] str, patient id (the unit of the evaluation's bootstrap)
    diameters: np.ndarray | None = None  # [N] float, nodule diameter in mm

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"view": self.views[i], "radiomics": self.radiomics[i], "label": self.labels[i]}


@functools.lru_cache(maxsize=8)
def _scan(name: str, data_dir: str, split: str, ct_size: int, view: str,
          stamp: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Stored label, fold, radiomics and HU view of every example of a split (read once per process and build)."""
    source = _open_split(name, data_dir, split, stamp)
    out = {"label": [], "fold": [], "patient_id": [], "radiomics": [], "view": [], "ratings": [], "diameter_mm": []}
    for i in range(len(source)):
        ex = source[i]
        if np.shape(ex["ct"]) != (ct_size,) * 3:
            raise DatasetError(f"Dataset {name} in {data_dir} stores crops of shape {np.shape(ex['ct'])}, the "
                               f"builder config {name.split('/')[-1]} expects {(ct_size,) * 3}: rebuild it with "
                               f"`python run.py prepare`.")
        out["label"].append(int(ex["label"]))
        out["fold"].append(int(ex["fold"]))
        out["patient_id"].append(ex["patient_id"].decode() if isinstance(ex["patient_id"], bytes)
                                 else str(ex["patient_id"]))
        out["ratings"].append(np.asarray(ex["ratings"], np.int32))
        out["diameter_mm"].append(float(ex["diameter_mm"]))
        out["radiomics"].append(np.asarray(ex["radiomics"], np.float32))
        out["view"].append(extract_view(np.asarray(ex["ct"]), view))
    return {k: np.stack(v) for k, v in out.items()}


def crop_size(data_config: ml_collections.ConfigDict) -> int:
    """Edge of the stored cube, from the builder config name (crop<S>_...)."""
    head = str(data_config.builder_config).split("_")[0]
    if not head.startswith("crop") or not head[4:].isdigit():
        raise DatasetError(f"config.data.builder_config={data_config.builder_config!r} is not a lidc_idri builder "
                           f"config (crop64_1mm, crop32_1mm).")
    return int(head[4:])


def label_protocol(data_config: ml_collections.ConfigDict) -> tuple[str, int, float]:
    """(label_rule, min_readers, min_diameter_mm) of the config (defaults for configs saved before they existed);
    a binary rule needs label_scheme='binary'. See autorad_jax/data/labels.py."""
    rule = str(data_config.get("label_rule", "mean"))
    if labels_lib.is_binary(rule) and data_config.label_scheme != "binary":
        raise ConfigError(f"config.data.label_rule={rule!r} gives two classes; set config.data.label_scheme=binary.")
    return rule, int(data_config.get("min_readers", 1)), float(data_config.get("min_diameter_mm", 0.0))


def records(data_config: ml_collections.ConfigDict, role: str) -> Records:
    """Records of `role` ('train' | 'validation' | 'test') under the label protocol, scheme and cross-validation fold.

    Labels come from the stored per-reader ratings by config.data.label_rule, and the cohort is narrowed by
    min_readers and min_diameter_mm (autorad_jax/data/labels.py). With data.cv_fold = k >= 0, 'train' is train +
    validation without fold k and 'validation' is fold k (the stored folds, or with data.cv_repeat = r > 0 the
    patients dealt anew by `cv_folds`); a split the dataset left empty is then skipped.
    """
    if role not in SPLITS:
        raise ConfigError(f"split {role!r}; use one of {SPLITS}.")
    k = int(data_config.cv_fold)
    splits = ("train", "validation") if k >= 0 and role != "test" else (role,)
    name, data_dir, size = dataset_name(data_config), str(data_config.data_dir), crop_size(data_config)
    if len(splits) > 1:
        splits = tuple(s for s in splits if s not in _empty_splits(name, data_dir)) or splits
    classes = scheme_classes(data_config.label_scheme)
    rule, min_readers, min_diameter_mm = label_protocol(data_config)
    metas = []
    for split in splits:
        open_split(data_config, split)
        metas.append(_scan(name, data_dir, split, size, data_config.view, _build_stamp(name, data_dir)))
    meta = {key: np.concatenate([m[key] for m in metas]) for key in metas[0]}
    meta["label"] = labels_lib.labels(meta["ratings"], rule)
    keep = np.isin(meta["label"], classes)
    keep &= labels_lib.cohort(meta["ratings"], meta["diameter_mm"], min_readers, min_diameter_mm)
    if k >= 0 and role != "test":
        folds = cv_folds(meta["patient_id"], meta["fold"], int(data_config.get("cv_repeat", 0)))
        keep &= (folds != k) if role == "train" else (folds == k)
    recs = Records(views=meta["view"][keep], radiomics=meta["radiomics"][keep],
                   labels=np.searchsorted(np.asarray(classes), meta["label"][keep]).astype(np.int32),
                   patients=meta["patient_id"][keep], diameters=meta["diameter_mm"][keep])
    if len(recs) == 0:
        raise DatasetError(f"No {role} examples in {name} ({data_dir}) for label_scheme={data_config.label_scheme} "
                           f"label_rule={rule} min_readers={min_readers} min_diameter_mm={min_diameter_mm} "
                           f"cv_fold={k}.")
    return recs


def cv_folds(patients: np.ndarray, stored: np.ndarray, repeat: int) -> np.ndarray:
    """Cross-validation fold of each example: the stored one for repeat 0; for repeat r > 0 the patients dealt anew
    into CV_FOLDS folds of (almost) equal patient counts, in an order drawn with seed r (repeated cross-validation)."""
    if repeat < 0:
        raise ConfigError(f"config.data.cv_repeat={repeat}; use 0 (the stored folds) or a positive seed.")
    if repeat == 0:
        return stored
    ids, patient_of = np.unique(np.asarray(patients), return_inverse=True)
    fold_of_id = np.empty(len(ids), np.int64)
    fold_of_id[np.random.default_rng(repeat).permutation(len(ids))] = np.arange(len(ids)) % CV_FOLDS
    return fold_of_id[patient_of]


# ------------------------------------------------------------------------------------------------------------------
# Batches: grain for training (sharded per host, shuffled, checkpointable); a padded pass for evaluation.
# ------------------------------------------------------------------------------------------------------------------

def train_loader(data_config: ml_collections.ConfigDict, recs: Records, stats: RadiomicsStats, seed: int,
                 shard_options: grain.ShardOptions | None = None) -> grain.DataLoader:
    """Endless shuffled training batches of {'view', 'radiomics' (standardised), 'label'} of one shard (default:
    this JAX process's); its iterator is checkpointable.

    Each epoch is a new permutation of the shard's records, so a resumed iterator replays exactly what an
    uninterrupted one would have produced (augmentation happens on the devices, keyed by the step).
    """
    shard_options = shard_options or grain.ShardByJaxProcess(drop_remainder=True)
    source = dataclasses.replace(recs, radiomics=stats.apply(recs.radiomics))
    return grain.DataLoader(
        data_source=source,
        sampler=grain.IndexSampler(len(recs), shard_options, shuffle=True, num_epochs=None, seed=seed),
        operations=[grain.Batch(data_config.batch_size // shard_options.shard_count, drop_remainder=True)],
        worker_count=int(data_config.worker_count),
        read_options=grain.ReadOptions(num_threads=0))  # records are in memory: reader threads only add overhead


def eval_indices(n: int, global_batch_size: int, process_index: int, process_count: int) -> Iterator[np.ndarray]:
    """Record indices this process reads for each global batch of a pass over n records (-1 = padding).

    Global batch b covers records [b*G, (b+1)*G); process p reads its contiguous 1/P of it.
    """
    local = global_batch_size // process_count
    for start in range(0, n, global_batch_size):
        idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
        yield np.where(idx < n, idx, -1)


def eval_batches(data_config: ml_collections.ConfigDict, recs: Records,
                 stats: RadiomicsStats) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `recs` as this process's part of padded global batches of views and standardised radiomics;
    'index' is each row's record index (-1: padding, a copy of record 0)."""
    radiomics = stats.apply(recs.radiomics)
    for idx in eval_indices(len(recs), data_config.eval_batch_size, jax.process_index(), jax.process_count()):
        rows = np.maximum(idx, 0)
        yield {"view": recs.views[rows], "radiomics": radiomics[rows], "index": idx.astype(np.int32)}


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """This process's part of a batch -> global arrays split over the batch axis as `sharding` says."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
