"""Patient-level bootstrap: percentile 95% confidence intervals of every metric, and paired differences.

Patients (not nodules) are resampled with replacement, since nodules of one patient are not independent. Replicate b
draws `numpy.random.default_rng(seed).integers(P, size=(replicates, P))[b]` of the P sorted unique patient ids; a
nodule counts as often as its patient was drawn. All replicates are evaluated at once (`metrics.weighted_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autorad_jax.train.metrics import classification_metrics, weighted_metrics

REPLICATES = 1000
SEED = 0
LEVEL = 0.95


def patient_weights(patients: np.ndarray, replicates: int = REPLICATES, seed: int = SEED) -> np.ndarray:
    """[replicates, N] how often each nodule appears in each patient resample."""
    ids, patient_of = np.unique(np.asarray(patients), return_inverse=True)
    draws = np.random.default_rng(seed).integers(len(ids), size=(replicates, len(ids)))
    counts = np.zeros((replicates, len(ids)))
    np.add.at(counts, (np.arange(replicates)[:, None], draws), 1.0)
    return counts[:, patient_of]


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of the defined (non-NaN) replicate values; NaN when none is defined."""
    defined = values[~np.isnan(values)]
    if not len(defined):
        return float("nan"), float("nan")
    lo, hi = np.percentile(defined, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def intervals(labels: np.ndarray, probs: np.ndarray, names: Sequence[str], patients: np.ndarray,
              point: dict, diameters: np.ndarray | None = None, replicates: int = REPLICATES,
              seed: int = SEED) -> dict:
    """{"ci95": {metric: [low, high] or None}, "bootstrap": {...}, "notes": [...]} for every scalar metric of
    `point` (the metrics of the data as they are); a metric undefined there has no interval, and replicates where
    a metric is undefined are counted, named in the notes and left out of its interval."""
    reps = weighted_metrics(labels, probs, patient_weights(patients, replicates, seed), names, diameters)
    ci, undefined, notes = {}, {}, []
    for key, values in reps.items():
        if key.startswith("num_examples"):
            continue
        missing = int(np.isnan(values).sum())
        if missing:
            undefined[key] = missing
        if np.isnan(point[key]) or missing == replicates:
            ci[key] = None
            continue
        ci[key] = list(percentile_interval(values))
        if missing:
            notes.append(f"{key}: undefined in {missing} of {replicates} patient resamples (a class or side absent "
                         f"from the resample); its interval is over the other {replicates - missing}.")
    info = {"unit": "patient", "patients": int(len(np.unique(patients))), "replicates": replicates, "seed": seed,
            "level": LEVEL, "method": "percentile", "undefined_replicates": undefined}
    return {"ci95": ci, "bootstrap": info, "notes": notes}


def format_value(metrics: dict, key: str) -> str:
    """'0.812 [0.741, 0.870]' (the 95% interval when the metrics hold one), 'undefined' for NaN."""
    value = metrics[key]
    if value is None or np.isnan(value):
        return "undefined"
    ci = metrics.get("ci95", {}).get(key)
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def evaluation_metrics(labels: np.ndarray, probs: np.ndarray, names: Sequence[str], patients: np.ndarray,
                       diameters: np.ndarray | None = None, replicates: int = REPLICATES, seed: int = SEED) -> dict:
    """`classification_metrics` with their patient-bootstrap intervals (`intervals`) and the notes of both."""
    point = classification_metrics(labels, probs, names, diameters)
    stats = intervals(labels, probs, names, patients, point, diameters, replicates, seed)
    return {**point, "ci95": stats["ci95"], "bootstrap": stats["bootstrap"], "notes": point["notes"] + stats["notes"]}
