"""Finds the series folders of a manual_dir in the TCIA layout, following symlinked folders and files."""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator

from tfds_lidc import ct_series

_PATIENT_RE = re.compile(r'LIDC-IDRI-\d+')


@dataclasses.dataclass(frozen=True)
class Folder:
    """A folder holding DICOM slices (a series) or reader XML only, or one reached again through a symlink."""
    rel: str               # relative to manual_dir, as the user laid it out (symlinks not resolved)
    patient_id: str        # LIDC-IDRI-NNNN from the path, else its first component
    has_dicom: bool
    same_as: str = ''      # for a folder reached again: the path it was read at (not read twice)


def discover(manual_dir: str) -> list[Folder]:
    """Every folder under `manual_dir` holding DICOM slices (`ct_series.dicom_files`: .dcm, or files with the DICOM
    preamble) or .xml files, sorted by path.

    Symlinked folders are followed; a folder reached twice (a symlink loop, or two links to one folder) is read once,
    at its first path in sorted order, and listed at the others with `same_as`.
    """
    found = []
    for root, files, same_as in walk_folders(manual_dir):
        rel = os.path.relpath(root, manual_dir)
        if same_as:
            found.append(Folder(rel, _patient_id(rel), False, same_as=os.path.relpath(same_as, manual_dir)))
            continue
        has_dicom = bool(files) and bool(ct_series.dicom_files(root))
        if has_dicom or any(f.lower().endswith('.xml') for f in files):
            found.append(Folder(rel, _patient_id(rel), has_dicom))
    return sorted(found, key=lambda f: f.rel)


def walk_folders(top: str) -> Iterator[tuple[str, list[str], str]]:
    """(folder, its file names, '') for `top` and every folder below it, subfolders in name order, symlinked folders
    followed; a folder met again (through a symlink loop, or a second link) as (path, [], the path it was met at) and
    not entered."""
    seen = {}
    for root, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            yield root, [], seen[real]
            continue
        seen[real] = root
        dirs.sort()
        yield root, files, ''


def _patient_id(rel: str) -> str:
    match = _PATIENT_RE.search(rel)
    return match.group(0) if match else rel.split(os.sep)[0]
