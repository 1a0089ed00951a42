"""A CSV of nodules, one per row, as `predict --nodules` and the nodule_table dataset read it.

A row gives the CT as `ct` (a DICOM series folder or a .mhd / .nii.gz / .nrrd volume, relative to the CSV's folder)
or as `seriesuid` (a `<seriesuid>.mhd` / `.nii.gz` / `.nrrd` file, or a DICOM series folder named by or containing
the UID, at any depth under a root folder), and the nodule as `mask` (a mask file on the CT's grid), `xml` (a LIDC
reader XML) or `coordX`, `coordY`, `coordZ` (centre in mm) with `diameter_mm`, as LUNA16's annotations.csv.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Optional

from tfds_lidc.errors import LidcDataError
from tfds_lidc.nodule_masks import NoduleInputError

VOLUME_SUFFIXES = (".mhd", ".nii.gz", ".nii", ".nrrd")
CENTER_COLUMNS = ("coordX", "coordY", "coordZ")


class NoduleTableError(LidcDataError, ValueError):
    """The nodule CSV cannot be read, or its columns say neither a CT nor a nodule."""


def read_rows(path: str, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The CSV's rows as dicts (header names and values stripped); NoduleTableError naming the file and the problem
    when it cannot be read, has no rows, no CT or nodule column, or lacks a `required` column."""
    try:
        with open(path, newline="") as f:
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise NoduleTableError(f"nodule table {path}: {e}") from e
    columns = set(rows[0]) if rows else set()
    if not rows:
        raise NoduleTableError(f"nodule table {path} has no rows.")
    if not columns & {"ct", "seriesuid"}:
        raise NoduleTableError(f"nodule table {path} has neither a 'ct' nor a 'seriesuid' column (columns: "
                               f"{', '.join(sorted(columns))}).")
    if not (columns & {"mask", "xml"} or set(CENTER_COLUMNS) <= columns):
        raise NoduleTableError(f"nodule table {path} gives no nodule: add 'mask', 'xml', or 'coordX', 'coordY', "
                               f"'coordZ' with 'diameter_mm' (columns: {', '.join(sorted(columns))}).")
    missing = [c for c in required if c not in columns]
    if missing:
        raise NoduleTableError(f"nodule table {path} has no {', '.join(repr(c) for c in missing)} column (columns: "
                               f"{', '.join(sorted(columns))}).")
    return rows


def index_ct_root(ct_root: str) -> dict[str, str]:
    """{name: path} of the volume files (name without suffix) and folders under `ct_root`."""
    if not os.path.isdir(ct_root):
        raise NoduleTableError(f"--ct_root {ct_root} is not a folder.")
    found = {}
    for folder, dirs, files in os.walk(ct_root):
        for d in dirs:
            found.setdefault(d, os.path.join(folder, d))
        for f in files:
            for suffix in VOLUME_SUFFIXES:
                if f.endswith(suffix):
                    found.setdefault(f[:-len(suffix)], os.path.join(folder, f))
    return found


def find_series(uid: str, index: dict[str, str], root: str) -> str:
    """The CT of series `uid`: a file or folder named by the UID, else a folder whose name contains it. `root` names
    the folder searched in the message ('--ct_root DIR')."""
    if uid in index:
        return index[uid]
    matches = sorted(path for name, path in index.items() if uid in name and os.path.isdir(path))
    if not matches:
        raise NoduleInputError(f"series {uid} is not under {root} (no {uid}.mhd / .nii.gz / .nrrd file or folder "
                               f"named by it).")
    return matches[0]


def row_ct(row: dict[str, str], base: str, root: Optional[str], index: Optional[dict[str, str]]) -> str:
    """The path of a row's CT: its `ct` relative to `base`, or its `seriesuid` found in `index` (of the folder that
    `root` names, None when there is none)."""
    if row.get("ct"):
        return os.path.join(base, row["ct"])
    if not row.get("seriesuid"):
        raise NoduleInputError("the row gives neither 'ct' nor 'seriesuid'.")
    if root is None:
        raise NoduleInputError("a 'seriesuid' row needs --ct_root (the folder holding the series).")
    return find_series(row["seriesuid"], index, root)


def row_nodule(row: dict[str, str], base: str, coordinates: str = "lps") -> dict[str, Any]:
    """The nodule of a row: {'mask': path, 'xml': path, 'center': [x, y, z] (strings), 'diameter': mm}, each None
    when the row does not give it, and 'coordinates', the centre's convention (the row's `coordinates` column, else
    `coordinates`: 'lps' for patient LPS mm, 'ras' for RAS mm); paths relative to `base`."""
    center = [row.get(c, "") for c in CENTER_COLUMNS]
    try:
        diameter = float(row["diameter_mm"]) if row.get("diameter_mm") else None
    except ValueError as e:
        raise NoduleInputError(f"diameter_mm {row['diameter_mm']!r} is not a number.") from e
    return dict(mask=os.path.join(base, row["mask"]) if row.get("mask") else None,
                xml=os.path.join(base, row["xml"]) if row.get("xml") else None,
                center=center if any(center) else None, diameter=diameter,
                coordinates=row.get("coordinates", "").lower() or coordinates)
