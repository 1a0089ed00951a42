"""Malignancy label protocols, applied when the dataset is read to the readers' stored ratings and the nodule size.

LIDC-IDRI gives each nodule >= 3 mm up to four malignancy ratings (1 highly unlikely .. 5 highly suspicious, one per
reader; 0 in the dataset means no reader or no valid rating). A protocol turns them into a class:

  label_rule = '<score>' or '<score>_<binary protocol>'
    score: 'mean' or 'median' of the valid ratings.
    '<score>' alone: three classes, benign < 2.5 <= unsure <= 3.5 < malignant (AutoRad-Lung's rule on the mean;
      the stored `label` of the dataset is 'mean').
    binary protocols (benign if the score < 3, malignant if > 3), which differ on a score of exactly 3, as used in
    the LIDC-IDRI malignancy literature:
      'exclude3'   the nodule is left out;
      '3benign'    counted as benign;
      '3malignant' counted as malignant.
  min_readers: leave out nodules with fewer valid ratings (e.g. 3 for a cohort rated by at least three readers).
  min_diameter_mm: leave out nodules whose longest axial diameter (of the consensus mask) is smaller.

Classes are the dataset's stored class ids: 0 benign, 1 unsure, 2 malignant; -1 marks a nodule left out.
A nodule_table example may have a given label instead (pathology-confirmed benign / malignant, or a class): it is kept
as stored under every rule (the binary scheme drops a given 'unsure'), and min_readers does not apply to it.
"""

from __future__ import annotations

import numpy as np

from autorad_jax.errors import ConfigError

BENIGN, UNSURE, MALIGNANT, LEFT_OUT = 0, 1, 2, -1
SCORES = ("mean", "median")
BINARY_PROTOCOLS = {"exclude3": LEFT_OUT, "3benign": BENIGN, "3malignant": MALIGNANT}


def parse_rule(label_rule: str) -> tuple[str, str | None]:
    """(score, binary protocol or None) of a label rule; ConfigError naming the choices if it is not one."""
    score, _, protocol = str(label_rule).partition("_")
    if score not in SCORES or (protocol and protocol not in BINARY_PROTOCOLS):
        choices = list(SCORES) + [f"{s}_{p}" for s in SCORES for p in BINARY_PROTOCOLS]
        raise ConfigError(f"config.data.label_rule={label_rule!r}; use one of {choices}.")
    return score, protocol or None


def is_binary(label_rule: str) -> bool:
    """Whether the rule gives two classes (benign, malignant)."""
    return parse_rule(label_rule)[1] is not None


def labels(ratings: np.ndarray, label_rule: str = "mean") -> np.ndarray:
    """int32 [N] stored class ids (-1: left out) of [N, R] per-reader ratings (values outside 1-5: no rating)."""
    score_name, protocol = parse_rule(label_rule)
    r = np.asarray(ratings, np.float64)
    valid = (r >= 1) & (r <= 5)
    rated = valid.any(axis=1)
    values = np.where(valid, r, np.nan)
    values[~rated] = 0.0  # no score; labelled LEFT_OUT below
    score = np.nanmean(values, axis=1) if score_name == "mean" else np.nanmedian(values, axis=1)
    if protocol is None:
        out = np.where(score < 2.5, BENIGN, np.where(score > 3.5, MALIGNANT, UNSURE))
    else:
        three = np.isclose(score, 3.0)
        out = np.where(three, BINARY_PROTOCOLS[protocol], np.where(score < 3, BENIGN, MALIGNANT))
    return np.where(rated, out, LEFT_OUT).astype(np.int32)


def cohort(ratings: np.ndarray, diameter_mm: np.ndarray, min_readers: int = 1, min_diameter_mm: float = 0.0,
           given: np.ndarray | None = None) -> np.ndarray:
    """bool [N]: nodules with at least `min_readers` valid ratings and a diameter of at least `min_diameter_mm`;
    nodules whose label is `given` (bool [N]: a pathology or other class, not readers' ratings) need no rating."""
    r = np.asarray(ratings)
    rated = ((r >= 1) & (r <= 5)).sum(axis=1) >= int(min_readers)
    if given is not None:
        rated |= np.asarray(given, bool)
    return rated & (np.asarray(diameter_mm) >= min_diameter_mm)
