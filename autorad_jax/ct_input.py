"""The CT and the nodule masks predict is given: a DICOM series folder or a NIfTI / NRRD / MetaImage file, checked in
Hounsfield units and brought to patient LPS axes (tfds_lidc.orientation), and a mask file, a centre and diameter (a
sphere; the centre in patient LPS mm, or RAS mm when the user says so), or a LIDC reader XML (readers' marks clustered
into consensus masks as the dataset builder does)."""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from autorad_jax.errors import PredictInputError
from tfds_lidc import ct_series, discover, image_checks, nodule_masks as masks_lib, orientation, xml_reader
from tfds_lidc import nodules as nodules_lib
from tfds_lidc.lidc_idri import Builder
from tfds_lidc.nodule_masks import COORDINATES, DIAMETER_RANGE_MM, SPHERE_NOTE  # noqa: F401  (predict's API)


@contextlib.contextmanager
def _as_predict_input_error():
    """tfds_lidc.nodule_masks' refusals (a mask file, a centre, a volume file) raised as PredictInputError."""
    try:
        yield
    except masks_lib.NoduleInputError as e:
        raise PredictInputError(str(e)) from e


def read_ct(path: str, hu_range: Sequence[float] = image_checks.DEFAULT_HU_RANGE, series_uids: Sequence[str] = (),
            around: Optional[tuple[Sequence[float], float]] = None
            ) -> tuple[sitk.Image, Optional[ct_series.CtSeries]]:
    """The CT in HU with its axes along patient LPS (and its DICOM series, for a folder: the first of `series_uids`
    the folder holds, else its largest axial CT stack; only the slices the cube `around` reaches, see
    `sphere_region`), complete (image_checks) and every value finite and within `hu_range`
    (tfds_lidc.nodule_masks.read_ct, the builder's reader too); PredictInputError naming the path and the reason."""
    if path is None:
        raise PredictInputError("no CT given (--ct: a DICOM series folder, or a NIfTI / NRRD / MetaImage file).")
    if os.path.isdir(path) and not ct_series.dicom_files(path):
        raise PredictInputError(_no_series_message(path))
    with _as_predict_input_error():
        image, series = masks_lib.read_ct(path, hu_range, series_uids, around)
    return orientation.to_lps(image), series


# Half the side of the largest crop a model reads (the dataset builder's configs): what a sphere nodule's example can
# reach beyond its own radius.
CROP_REACH_MM = max(c.crop_size * c.spacing_mm for c in Builder.BUILDER_CONFIGS) / 2


def sphere_region(center, diameter, coordinates: str = "lps") -> Optional[tuple[np.ndarray, float]]:
    """The cube around a sphere nodule that its example can reach (centre in patient LPS mm, half side in mm), so
    that read_ct reads a DICOM series only there; None when the centre or the diameter cannot be used
    (nodule_masks then says why, after reading the whole CT as without a region)."""
    lo, hi = DIAMETER_RANGE_MM
    try:
        point = masks_lib.parse_center(center, coordinates)
        return (point, max(CROP_REACH_MM, float(diameter) / 2)) if lo <= float(diameter) <= hi else None
    except (masks_lib.NoduleInputError, TypeError, ValueError):
        return None


def series_wanted(ct: str, series_uid: Optional[str], xml: Optional[str]) -> list[str]:
    """The series to read from the DICOM folder `ct`: the user's (`series_uid`), else the one the reader XML names (an
    XML that names none, or does not parse, chooses nothing: xml_masks says what is wrong with it). None of a volume
    file, where `series_uid` is refused."""
    if not os.path.isdir(ct or ""):
        if series_uid:
            raise PredictInputError(f"--series {series_uid}: the CT {ct} is not a DICOM folder, it has no series to "
                                    f"choose from.")
        return []
    if series_uid:
        return [series_uid]
    if xml is None:
        return []
    try:
        named = xml_reader.parse_reader_xml(xml).series_uid
    except xml_reader.XmlError:
        return []
    return [named] if named else []


def series_description(series: Optional[ct_series.CtSeries]) -> dict:
    """What predict says of the DICOM series it read: its UID, its slices (and those read, when only the part
    around the nodule was) and the folder's files it left out."""
    if series is None:
        return {}
    read = {"slices_read": len(series.sop_uids)} if series.slices_not_read else {}
    return {"series": {"series_uid": series.series_uid, "slices": len(series.sop_uids) + series.slices_not_read,
                       **read, "files_ignored": series.files_ignored}}


def _no_series_message(path: str) -> str:
    """Why a folder without DICOM files is not a CT, naming the series folders below it (a patient or study folder
    of the TCIA layout holds them)."""
    below = sorted(folder for folder, _, same_as in discover.walk_folders(path)
                   if folder != path and not same_as and ct_series.dicom_files(folder))
    if not below:
        return f"unreadable CT {path}: no DICOM files in it or in its subfolders."
    return (f"unreadable CT {path}: no DICOM files in the folder itself; give one series folder as --ct: "
            f"{', '.join(below[:5])}{f' (and {len(below) - 5} more)' if len(below) > 5 else ''}.")


def xml_masks(path: str, series: Optional[ct_series.CtSeries], consensus_level: float, *,
              matches_ct: bool = False, keep_incomplete: bool = False) -> list[tuple[Optional[sitk.Image], dict]]:
    """(consensus mask, description) of every lesion of a LIDC reader XML, its readers' marks clustered and masked as
    the dataset builder does. Each says whether the series holds all its marks ('complete') and lists the reader
    marks the XML holds but the series does not ('xml_issues'); a lesion that is not predicted has no mask (None) and
    says why ('skipped'): no mark in the series, marks outside it (incomplete, unless `keep_incomplete`), smaller than
    3 mm, or no voxel with `consensus_level` reader agreement.

    An XML that names no series is refused unless `matches_ct` says it was made for this CT; one that gives no lesion
    to predict is refused naming each lesion's reason.
    """
    if series is None:
        raise PredictInputError("--xml needs the CT as a DICOM series folder (the reader XML names its slices).")
    try:
        reader_xml = xml_reader.parse_reader_xml(path)
    except xml_reader.XmlError as e:
        raise PredictInputError(f"reader XML {path}: {e}") from e
    if reader_xml.series_uid is None and not matches_ct:
        raise PredictInputError(f"reader XML {path} names no series (no SeriesInstanceUid), so nothing shows it was "
                                f"made for the CT {series.series_uid}; pass --xml_matches_ct if it was.")
    if reader_xml.series_uid not in (None, series.series_uid):
        raise PredictInputError(f"reader XML {path} is for series {reader_xml.series_uid}, the CT is series "
                                f"{series.series_uid}.")
    lesions, issues = nodules_lib.find_lesions(reader_xml, series.sop_uids, series.z_positions,
                                               series.image.GetSpacing()[2], tol=series.slice_thickness)
    out, incomplete = [], False
    for index, lesion in enumerate(lesions):
        info = {"nodule_index": index, "complete": lesion.complete, "xml_issues": lesion.issues + issues}
        skip = lesion.skip_reason(series.z_positions, keep_incomplete)
        kept, _ = nodules_lib.select_readers(list(lesion.annotations))
        mask = None if skip else nodules_lib.consensus_mask_image(kept, series.image, consensus_level)
        if skip is None and mask is None:
            skip = "", f"no voxel reaches {consensus_level:.0%} reader agreement"
        if skip is not None:
            out.append((None, {**info, "skipped": skip[1]}))
            incomplete |= skip[0] == nodules_lib.INCOMPLETE
            continue
        ratings = nodules_lib.reader_ratings(kept)[:, -1]
        out.append((mask, {**info, "readers": int(np.count_nonzero(ratings)),
                           "reader_malignancy": [int(r) for r in ratings if r > 0]}))
    if all(mask is None for mask, _ in out):
        reasons = "; ".join(f"lesion {info['nodule_index']}: {info['skipped']}" for _, info in out)
        hint = " (--keep_incomplete predicts incomplete ones)" if incomplete else ""
        raise PredictInputError(f"reader XML {path} gives no nodule to predict in this series: "
                                f"{reasons or 'it marks no nodule'}{hint}.")
    return out


def nodule_masks(ct: sitk.Image, series: Optional[ct_series.CtSeries], *, mask: Optional[str], center, diameter,
                 xml: Optional[str], consensus_level: float, xml_matches_ct: bool = False, coordinates: str = "lps",
                 keep_incomplete: bool = False) -> list[tuple[Optional[sitk.Image], dict]]:
    """(mask, description) of each nodule to predict, from exactly one of mask / center + diameter / xml (with an XML,
    of every lesion, those not predicted without a mask: see xml_masks); a diameter or a mask's equivalent-sphere
    diameter outside DIAMETER_RANGE_MM / MASK_DIAMETER_RANGE_MM is refused. `center` is x,y,z in patient LPS mm, or in
    RAS mm with `coordinates='ras'`."""
    given = [name for name, v in (("--mask", mask), ("--center", center), ("--xml", xml)) if v is not None]
    if len(given) != 1:
        raise PredictInputError(f"give the nodule with exactly one of --mask, --center (with --diameter) or --xml; "
                                f"got {', '.join(given) or 'none'}.")
    if mask is not None:
        with _as_predict_input_error():
            return [(masks_lib.read_mask(mask, ct), {"mask": f"mask file {os.path.abspath(mask)}"})]
    if center is not None:
        lo, hi = DIAMETER_RANGE_MM
        if diameter is None or not lo <= float(diameter) <= hi:
            raise PredictInputError(f"--center needs a --diameter from {lo:g} to {hi:g} mm, a lung nodule's or mass's "
                                    f"(got {diameter if diameter is None else float(diameter)}).")
        with _as_predict_input_error():
            point = masks_lib.parse_center(center, coordinates)
            given = "" if coordinates == "lps" else f", given as RAS {orientation.ras_to_lps(point).tolist()} mm"
            return [(masks_lib.sphere_mask(ct, point, float(diameter)),
                     {"mask": f"sphere of diameter {float(diameter)} mm at LPS {point.tolist()} mm{given}",
                      "note": SPHERE_NOTE})]
    return [(m, {"mask": f"consensus (>= {consensus_level:.0%} of readers) of reader XML {os.path.abspath(xml)}",
                 **info}) for m, info in xml_masks(xml, series, consensus_level, matches_ct=xml_matches_ct,
                                                   keep_incomplete=keep_incomplete)]

