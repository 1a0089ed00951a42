"""Deterministic patient-level splits and folds."""
from __future__ import annotations

import hashlib

SPLIT_FRACTIONS = (('test', 0.15), ('validation', 0.15))
NUM_FOLDS = 5


def _rank_key(patient_id: str) -> str:
    return hashlib.sha256(f'lidc_idri:{patient_id}'.encode()).hexdigest()


def assign(patient_ids: list[str]) -> dict[str, tuple[str, int]]:
    """{patient: (split, fold)}: patients ordered by a hash of their id, cut into test/validation/train
    (15/15/70 %, at least one patient each when there are 3 or more) and dealt round-robin into folds."""
    ordered = sorted(set(patient_ids), key=_rank_key)
    n = len(ordered)
    counts = [max(round(frac * n), 1 if n >= 3 else 0) for _, frac in SPLIT_FRACTIONS]
    out, start = {}, 0
    for (name, _), count in zip(SPLIT_FRACTIONS, counts):
        for rank in range(start, start + count):
            out[ordered[rank]] = (name, rank % NUM_FOLDS)
        start += count
    for rank in range(start, n):
        out[ordered[rank]] = ('train', rank % NUM_FOLDS)
    return out
