"""Prediction for every nodule of a CSV, with the model loaded once (`run.py predict --nodules FILE.csv`).

One nodule per row, given by a CT and one of: a mask (`mask`), a centre and diameter (`coordX`, `coordY`, `coordZ` in
patient LPS mm, as LUNA16's annotations.csv, and `diameter_mm`; a `coordinates` column, or the `coordinates` option
for rows without it, says `ras` for RAS mm), or a LIDC reader XML (`xml`, which may give several nodules). The
CT is the `ct` column (a DICOM series folder or a volume file), or the row's `seriesuid` found under `--ct_root`
(`<seriesuid>.mhd` / `.nii.gz` / `.nrrd` files, or DICOM series folders named by or containing the UID, at any
depth); of a DICOM folder, the series `seriesuid` is read, else the one the reader XML names, else the largest axial
CT stack. Relative paths are relative to the CSV's folder. Writes predictions.csv and predictions.json with one row per
nodule; a row that cannot be predicted gets its error there and the others go on.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import time
from typing import Any, Optional

from tqdm import tqdm

from autorad_jax import ct_input, predictor as predictor_lib
from autorad_jax.errors import AutoradError
from tfds_lidc import image_checks
from tfds_lidc.errors import LidcDataError
from tfds_lidc.nodule_rows import index_ct_root, read_rows, row_ct, row_nodule


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row of a result row: scalars, probabilities as p_<label>, the centroid as three columns."""
    out = {k: v for k, v in row.items() if not isinstance(v, (dict, list))}
    out.update({f"p_{label}": p for label, p in row.get("probabilities", {}).items()})
    out.update({f"centroid_{a}_mm": v for a, v in zip("xyz", row.get("centroid_mm", []))})
    if "series" in row:
        out["series_read"] = row["series"]["series_uid"]
    return out


def predict_csv(nodules_csv: str, out_dir: str, *, workdir: Optional[str] = None, export_dir: Optional[str] = None,
                backend: str = "jax", ct_root: Optional[str] = None, report_dir: Optional[str] = None,
                coordinates: str = "lps") -> dict[str, Any]:
    """Predicts every row of `nodules_csv`; writes out_dir/predictions.{csv,json}; returns their paths and counts.
    Centres are patient LPS mm, or RAS mm in rows whose `coordinates` column says 'ras' (`coordinates`: the
    convention of rows that leave it empty or lack the column)."""
    rows = read_rows(nodules_csv)
    base = os.path.dirname(os.path.abspath(nodules_csv))
    index = index_ct_root(ct_root) if ct_root is not None else None
    root = f"--ct_root {ct_root}" if ct_root is not None else None
    predictor = predictor_lib.load_predictor(workdir=workdir, export_dir=export_dir, backend=backend)
    consensus = float(predictor.preprocessing["consensus_level"])
    read_ct = functools.lru_cache(maxsize=2)(ct_input.read_ct)  # rows of one series come one after another
    results, inputs, scored, titles = [], [], [], []
    start = time.perf_counter()
    for number, row in enumerate(tqdm(rows, desc="nodules", unit="row"), start=1):
        head = {"row": number, **{k: row[k] for k in ("seriesuid", "ct") if row.get(k)}}
        try:
            ct = row_ct(row, base, root, index)
            given = row_nodule(row, base, coordinates)
            uid = row.get("seriesuid") if os.path.isdir(ct) else None  # of a volume file, it only found the file
            image, series = read_ct(ct, image_checks.DEFAULT_HU_RANGE,
                                    tuple(ct_input.series_wanted(ct, uid, given["xml"])))
            masks = ct_input.nodule_masks(image, series, **given, consensus_level=consensus)
            found = [(info, predictor_lib.nodule_inputs(predictor, image, m)) for m, info in masks if m is not None]
        except (AutoradError, LidcDataError) as e:
            results.append({**head, "error": str(e)})
            continue
        results.extend({**head, "ct": os.path.abspath(ct), **info, "error": ""} for m, info in masks if m is None)
        for info, x in found:
            nodule = {**head, "ct": os.path.abspath(ct), **ct_input.series_description(series), **info,
                      **predictor_lib.score_nodule(predictor, x), "error": ""}
            results.append(nodule)
            if report_dir is not None:
                inputs.append(x)
                scored.append(nodule)
                titles.append(f"row {number}: {row.get('seriesuid') or os.path.basename(os.path.normpath(ct))}")
    seconds = time.perf_counter() - start
    os.makedirs(out_dir, exist_ok=True)
    csv_path, json_path = os.path.join(out_dir, "predictions.csv"), os.path.join(out_dir, "predictions.json")
    flat = [_flat(r) for r in results]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
    predicted = sum(1 for r in results if "probabilities" in r)
    summary = {"csv": os.path.abspath(csv_path), "json": os.path.abspath(json_path), "rows": len(rows),
               "predicted": predicted, "errors": len({r["row"] for r in results if r["error"]}),
               "seconds": seconds, "nodules_per_second": predicted / max(seconds, 1e-9)}
    if report_dir is not None:
        from autorad_jax import report
        summary["report"] = report.write_reports(predictor, inputs, scored, report_dir, titles)
    with open(json_path, "w") as f:
        json.dump({"model": predictor.source, "nodules": results, **summary}, f, indent=1)
    return summary
