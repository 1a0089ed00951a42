"""Input pipeline: lidc_idri / nodule_table records -> model inputs, with grain over `tfds.data_source` (no TensorFlow).

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
import hashlib
import os
from collections.abc import Iterator

import grain.python as grain
import jax
import ml_collections
import numpy as np
import scipy.special

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


RADIOMICS_TRANSFORMS = ("none", "signed_log", "quantile")
NUM_QUANTILES = 101  # points of the quantile table of each feature (fewer with fewer training examples)
QUANTILE_BOUND = 1e-7  # quantile transform: uniform scores are clipped to [b, 1 - b] before the normal quantile


def interp_ties_averaged(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """np.interp that maps a value repeated in `xp` to the mean of its `fp` range (forward and backward
    interpolation averaged, as sklearn's QuantileTransformer)."""
    return 0.5 * (np.interp(x, xp, fp) - np.interp(-x, -xp[::-1], -fp[::-1]))


def quantile_normal_scores(x: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """[N, F] values -> normal scores through each feature's empirical quantile table [Q, F] (float64); values at or
    beyond the table's ends get the extreme scores."""
    x = np.asarray(x, np.float64)
    refs = np.linspace(0.0, 1.0, len(quantiles))
    u = np.stack([interp_ties_averaged(x[:, f], quantiles[:, f], refs) for f in range(x.shape[1])], axis=1)
    u = np.where(x <= quantiles[0], 0.0, np.where(x >= quantiles[-1], 1.0, u))
    return scipy.special.ndtri(np.clip(u, QUANTILE_BOUND, 1.0 - QUANTILE_BOUND))


@dataclasses.dataclass(frozen=True)
class RadiomicsStats:
    """How raw radiomics become model inputs, fitted on the training split: an optional transform of the heavy-tailed
    features ('none' | 'signed_log': sign(x) log(1 + |x|) | 'quantile': normal scores of the training split's
    empirical quantiles, table `quantiles` [Q, F]), then standardisation by the transformed features' mean and std,
    then (clip > 0) clipping to [-clip, clip]."""
    mean: np.ndarray
    std: np.ndarray
    transform: str = "none"
    quantiles: np.ndarray | None = None
    clip: float = 0.0

    @classmethod
    def fit(cls, radiomics: np.ndarray, transform: str = "none", clip: float = 0.0) -> RadiomicsStats:
        """Statistics of an [N, F] feature matrix (a constant feature gets std 1, so it standardises to 0)."""
        if transform not in RADIOMICS_TRANSFORMS:
            raise ConfigError(f"config.data.radiomics_transform={transform!r}; use one of {RADIOMICS_TRANSFORMS}.")
        if not clip >= 0:
            raise ConfigError(f"config.data.radiomics_clip={clip!r}; use 0 (off) or a positive bound.")
        quantiles = None
        if transform == "quantile":
            x = np.asarray(radiomics, np.float64)
            q = np.nanquantile(x, np.linspace(0.0, 1.0, min(NUM_QUANTILES, len(x))), axis=0)
            quantiles = np.maximum.accumulate(q, axis=0)
        unfitted = cls(mean=np.zeros(0), std=np.zeros(0), transform=transform, quantiles=quantiles)
        x = np.asarray(unfitted.transformed(radiomics), np.float64)
        std = x.std(axis=0)
        return dataclasses.replace(unfitted, mean=x.mean(axis=0).astype(np.float32),
                                   std=np.where(std > 1e-12, std, 1.0).astype(np.float32), clip=float(clip))

    def transformed(self, radiomics: np.ndarray) -> np.ndarray:
        """The features after the transform, before standardisation (float64; 'none': as given)."""
        if self.transform == "none":
            return np.asarray(radiomics)
        x = np.asarray(radiomics, np.float64)
        if self.transform == "signed_log":
            return np.sign(x) * np.log1p(np.abs(x))
        return quantile_normal_scores(np.atleast_2d(x), self.quantiles).reshape(x.shape)

    def apply(self, radiomics: np.ndarray) -> np.ndarray:
        """Model inputs: transformed, standardised (and clipped) features; non-finite inputs become 0 (the mean)."""
        z = (np.asarray(self.transformed(radiomics), np.float32) - self.mean) / self.std
        z = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        return (np.clip(z, -self.clip, self.clip) if self.clip > 0 else z).astype(np.float32)

    def to_json(self) -> dict:
        """{'mean', 'std', 'transform', 'clip'[, 'quantiles' [Q][F]]}, as saved with every checkpoint and export."""
        out = {"mean": self.mean.tolist(), "std": self.std.tolist(), "transform": self.transform, "clip": self.clip}
        if self.quantiles is not None:
            out["quantiles"] = self.quantiles.tolist()
        return out

    @classmethod
    def from_json(cls, d: dict) -> RadiomicsStats:
        """The inverse of `to_json`; statistics saved before transforms existed load as transform 'none', no clip."""
        quantiles = np.asarray(d["quantiles"], np.float64) if "quantiles" in d else None
        return cls(mean=np.asarray(d["mean"], np.float32), std=np.asarray(d["std"], np.float32),
                   transform=d.get("transform", "none"), quantiles=quantiles, clip=float(d.get("clip", 0.0)))

    @classmethod
    def from_config(cls, data_config: ml_collections.ConfigDict, radiomics: np.ndarray) -> RadiomicsStats:
        """`fit` with config.data.radiomics_transform and radiomics_clip (defaults for configs saved before them)."""
        return cls.fit(radiomics, transform=str(data_config.get("radiomics_transform", "none")),
                       clip=float(data_config.get("radiomics_clip", 0.0)))


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
    if data_config.name == "nodule_table":
        return (f"Build it with `autorad prepare --dataset=nodule_table --manual_dir=/path/to/cohort (holding "
                f"nodules.csv) --builder_config={data_config.builder_config} --data_dir={data_config.data_dir}`, or "
                f"for a demo cohort `autorad synth --layout=table --out=workdir/cohort_demo` and then prepare "
                f"with --manual_dir=workdir/cohort_demo.")
    return (f"Build it with `autorad prepare --manual_dir=/path/to/LIDC-IDRI "
            f"--builder_config={data_config.builder_config} --data_dir={data_config.data_dir}`, or for demo data "
            f"`autorad synth --out=workdir/lidc_demo` and then prepare with --manual_dir=workdir/lidc_demo.")


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
    """The builder config called `name` (crop size, spacing, consensus level, radiomics parameters), one set for
    lidc_idri and nodule_table."""
    import tfds_lidc
    configs = {c.name: c for c in tfds_lidc.Builder.BUILDER_CONFIGS}
    if name not in configs:
        raise ConfigError(f"config.data.builder_config={name!r} is not one of {sorted(configs)}")
    return configs[name]


def radiomics_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The ordered pyradiomics feature names of the configured dataset (its metadata, read through its first split:
    an external test cohort has no train split)."""
    empty = _empty_splits(dataset_name(data_config), str(data_config.data_dir))
    info = open_split(data_config, next((s for s in SPLITS if s not in empty), "train")).dataset_info
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

    def __repr__(self) -> str:
        # grain checks a restored iterator's source by its repr, at every get_state: name the content by a digest
        # computed once, not by printing the arrays (milliseconds per call).
        return f"Records(num_records={len(self)}, view_shape={self.views.shape[1:]}, sha1={self._digest})"

    @functools.cached_property
    def _digest(self) -> str:
        digest = hashlib.sha1()
        for array in (self.views, self.radiomics, self.labels):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _scan(name: str, data_dir: str, split: str, ct_size: int, view: str,
          stamp: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Stored label, fold, radiomics and HU view of every example of a split (read once per process and build)."""
    source = _open_split(name, data_dir, split, stamp)
    out = {"label": [], "fold": [], "patient_id": [], "radiomics": [], "view": [], "ratings": [], "diameter_mm": [],
           "complete": [], "label_given": []}
    for i in range(len(source)):
        ex = source[i]
        if np.shape(ex["ct"]) != (ct_size,) * 3:
            raise DatasetError(f"Dataset {name} in {data_dir} stores crops of shape {np.shape(ex['ct'])}, the "
                               f"builder config {name.split('/')[-1]} expects {(ct_size,) * 3}: rebuild it with "
                               f"`autorad prepare`.")
        out["label"].append(int(ex["label"]))
        out["fold"].append(int(ex["fold"]))
        out["patient_id"].append(ex["patient_id"].decode() if isinstance(ex["patient_id"], bytes)
                                 else str(ex["patient_id"]))
        out["ratings"].append(np.asarray(ex["ratings"], np.int32))
        # nodule_table examples may carry a given label (pathology, a class) instead of readers' ratings.
        out["label_given"].append(ex.get("label_source", b"ratings") in (b"given", "given"))
        out["diameter_mm"].append(float(ex["diameter_mm"]))
        out["complete"].append(bool(ex["complete"]))
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

    Labels come from the stored per-reader ratings by config.data.label_rule (a nodule_table example with a given
    label, e.g. pathology, keeps it), and the cohort is narrowed by min_readers and min_diameter_mm
    (autorad_jax/data/labels.py); nodules cut by the end of their series (stored when the dataset was built with
    --keep_incomplete, `complete` False) only with data.include_incomplete. With data.cv_fold = k >= 0, 'train' is
    train + validation without fold k and 'validation' is fold k (the stored folds, or with data.cv_repeat = r > 0 the
    patients dealt anew by `cv_folds`); a split the dataset left empty is then skipped. With
    data.shuffle_radiomics (an ablation), each role's radiomics rows are permuted across its nodules.
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
    meta["label"] = np.where(meta["label_given"], meta["label"], labels_lib.labels(meta["ratings"], rule))
    keep = np.isin(meta["label"], classes)
    keep &= labels_lib.cohort(meta["ratings"], meta["diameter_mm"], min_readers, min_diameter_mm,
                              given=meta["label_given"])
    include_incomplete = bool(data_config.get("include_incomplete", False))
    keep &= meta["complete"] | include_incomplete
    if k >= 0 and role != "test":
        folds = cv_folds(meta["patient_id"], meta["fold"], int(data_config.get("cv_repeat", 0)))
        keep &= (folds != k) if role == "train" else (folds == k)
    recs = Records(views=meta["view"][keep], radiomics=meta["radiomics"][keep],
                   labels=np.searchsorted(np.asarray(classes), meta["label"][keep]).astype(np.int32),
                   patients=meta["patient_id"][keep], diameters=meta["diameter_mm"][keep])
    if len(recs) == 0:
        raise DatasetError(f"No {role} examples in {name} ({data_dir}) for label_scheme={data_config.label_scheme} "
                           f"label_rule={rule} min_readers={min_readers} min_diameter_mm={min_diameter_mm} "
                           f"include_incomplete={include_incomplete} cv_fold={k}.")
    if data_config.get("shuffle_radiomics", False):
        recs = shuffle_radiomics(recs, int(data_config.shuffle_seed), role)
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


def shuffle_radiomics(recs: Records, seed: int, role: str) -> Records:
    """`recs` with the radiomics rows permuted across nodules by a permutation fixed by (seed, role); labels, views
    and all else untouched. The ablation that measures what the radiomics conditioning contributes."""
    perm = np.random.default_rng([seed, SPLITS.index(role)]).permutation(len(recs))
    return dataclasses.replace(recs, radiomics=recs.radiomics[perm])


# ------------------------------------------------------------------------------------------------------------------
# Batches: grain for training (sharded per host, shuffled, checkpointable); a padded pass for evaluation.
# ------------------------------------------------------------------------------------------------------------------

class EpochSampler:
    """A grain sampler of endless epochs of N draws over the N records: draw k of the global sequence is entry k % N
    of the table of epoch k // N, fixed by (seed, epoch): a permutation of the records, or with `balanced_labels` N
    draws with replacement, record i with probability proportional to 1 / n_(class of i) so that every class is drawn
    equally often. The loader hands shard s the draws s, s + P, ...; being a function of (seed, k) alone, a restored
    iterator (whose state is the last k) replays what an uninterrupted one draws.

    grain's shuffling IndexSampler permutes each index on its own by cycle-walking a Feistel network, which costs
    milliseconds per record on a split of tens of records (the demo's); one table per epoch costs microseconds."""

    def __init__(self, num_records: int, seed: int, balanced_labels: np.ndarray | None = None):
        self._n, self._seed, self._p = num_records, seed, None
        if balanced_labels is not None:
            labels = np.asarray(balanced_labels)
            self._p = 1.0 / np.bincount(labels)[labels]
            self._p /= self._p.sum()
        self._table = (-1, np.empty(0, np.int64))  # (epoch, its draws): the epoch being read

    def __len__(self) -> int:
        return np.iinfo(np.int64).max

    def __repr__(self) -> str:  # grain compares it with the checkpoint's
        return f"EpochSampler(num_records={self._n}, seed={self._seed}, balanced={self._p is not None})"

    def _epoch(self, epoch: int) -> np.ndarray:
        if self._table[0] != epoch:
            rng = np.random.default_rng([self._seed, epoch])
            draws = rng.permutation(self._n) if self._p is None else rng.choice(self._n, size=self._n, p=self._p)
            self._table = (epoch, draws)
        return self._table[1]

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        epoch, position = divmod(index, self._n)
        return grain.RecordMetadata(index=index, record_key=int(self._epoch(epoch)[position]))


def train_loader(data_config: ml_collections.ConfigDict, recs: Records, stats: RadiomicsStats, seed: int,
                 shard_options: grain.ShardOptions | None = None) -> grain.DataLoader:
    """Endless shuffled training batches of {'view', 'radiomics' (standardised), 'label'} of one shard (default:
    this JAX process's); its iterator is checkpointable.

    Each epoch is a new permutation of the records, or with data.balanced_sampling class-balanced draws, dealt to the
    shards in turn (`EpochSampler`); either way a resumed iterator replays exactly what an uninterrupted one would have
    produced (augmentation happens on the devices, keyed by the step).
    """
    shard_options = shard_options or grain.ShardByJaxProcess(drop_remainder=True)
    source = dataclasses.replace(recs, radiomics=stats.apply(recs.radiomics))
    balanced = data_config.get("balanced_sampling", False)
    sampler = EpochSampler(len(recs), seed, recs.labels if balanced else None)
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        shard_options=shard_options,
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
