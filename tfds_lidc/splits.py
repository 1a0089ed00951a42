"""Deterministic patient-level splits and folds."""
from __future__ import annotations

import hashlib

SPLITS = ('train', 'validation', 'test')
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


def plan(with_nodules: list[str], others: list[str]) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
    """({patient: (split, fold)}, {empty split: why}).

    Splits are dealt over the patients with at least one nodule written, so that a patient whose series all
    failed leaves no split empty; the other patients go to train. With fewer than 3 such patients, validation
    and test are empty.
    """
    assignment = assign(with_nodules)
    assignment.update({p: ('train', f) for p, (_, f) in assign([p for p in others if p not in assignment]).items()})
    used = {split for split, _ in (assignment[p] for p in set(with_nodules))}
    n = len(set(with_nodules))
    empty = {s: (f'{n} patient(s) with a nodule written; train, validation and test need at least 3 '
                 f'(patients are split 70/15/15 %)') for s in SPLITS if s not in used}
    return assignment, empty
