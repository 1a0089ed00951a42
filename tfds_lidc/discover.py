"""Finds the series folders of a manual_dir in the TCIA layout, following symlinked folders and files."""
from __future__ import annotations

import dataclasses
import os
import re

_PATIENT_RE = re.compile(r'LIDC-IDRI-\d+')


@dataclasses.dataclass(frozen=True)
class Folder:
    """A folder holding DICOM slices (a series) or reader XML only."""
    rel: str               # relative to manual_dir, as the user laid it out (symlinks not resolved)
    patient_id: str        # LIDC-IDRI-NNNN from the path, else its first component
    has_dicom: bool


def discover(manual_dir: str) -> list[Folder]:
    """Every folder under `manual_dir` holding .dcm or .xml files, sorted by path.

    Symlinked folders are followed; a folder reached twice (a symlink loop, or two links to one folder under
    one patient) is read once, at its first path in sorted order.
    """
    found, seen = [], set()
    for root, dirs, files in os.walk(manual_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        names = [f.lower() for f in files]
        has_dicom = any(f.endswith('.dcm') for f in names)
        if has_dicom or any(f.endswith('.xml') for f in names):
            rel = os.path.relpath(root, manual_dir)
            match = _PATIENT_RE.search(rel)
            found.append(Folder(rel, match.group(0) if match else rel.split(os.sep)[0], has_dicom))
    return sorted(found, key=lambda f: f.rel)
