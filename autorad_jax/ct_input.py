"""The CT and the nodule masks predict is given: a DICOM series folder or a NIfTI / NRRD / MetaImage file, checked in
Hounsfield units, and a mask file, a centre and diameter (a sphere), or a LIDC reader XML (readers' marks clustered
into consensus masks as the dataset builder does)."""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from autorad_jax.errors import PredictInputError
from tfds_lidc import ct_series, discover, image_checks, nodule_masks as masks_lib, xml_reader
from tfds_lidc import nodules as nodules_lib
from tfds_lidc.nodule_masks import DIAMETER_RANGE_MM, SPHERE_NOTE  # noqa: F401  (predict's API)


def _checked(image: sitk.Image, path: str, hu_range: Sequence[float]) -> sitk.Image:
    """`image` after image_checks' Hounsfield check, as PredictInputError."""
    try:
        image_checks.check_hounsfield(image, path, hu_range)
    except image_checks.ImageCheckError as e:
        raise PredictInputError(str(e)) from e
    return image


@contextlib.contextmanager
def _as_predict_input_error():
    """tfds_lidc.nodule_masks' refusals (a mask file, a centre, a volume file) raised as PredictInputError."""
    try:
        yield
    except masks_lib.NoduleInputError as e:
        raise PredictInputError(str(e)) from e


def _read_volume(path: str, what: str) -> sitk.Image:
    """tfds_lidc.nodule_masks.read_volume, its refusal as PredictInputError."""
    with _as_predict_input_error():
        return masks_lib.read_volume(path, what)


def read_ct(path: str, hu_range: Sequence[float] = image_checks.DEFAULT_HU_RANGE
            ) -> tuple[sitk.Image, Optional[ct_series.CtSeries]]:
    """The CT in HU (and its DICOM series, for a folder), complete (image_checks) and every value finite and within
    `hu_range`; PredictInputError naming the path and the reason."""
    if path is None:
        raise PredictInputError("no CT given (--ct: a DICOM series folder, or a NIfTI / NRRD / MetaImage file).")
    if os.path.isdir(path):
        if not ct_series.dicom_files(path):
            raise PredictInputError(_no_series_message(path))
        try:
            series = ct_series.load_ct_series(path)
        except ct_series.SeriesError as e:
            raise PredictInputError(f"unreadable CT {path}: {e}") from e
        return _checked(series.image, path, hu_range), series
    if not os.path.isfile(path):
        raise PredictInputError(f"CT {path} does not exist.")
    image = _read_volume(path, "CT")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise PredictInputError(f"CT {path} is not a 3D scalar volume ({image.GetDimension()}D, "
                                f"{image.GetNumberOfComponentsPerPixel()} components per voxel).")
    return _checked(image, path, hu_range), None


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
              matches_ct: bool = False) -> list[tuple[sitk.Image, dict]]:
    """Consensus masks of the nodules of a LIDC reader XML (readers' marks clustered as the dataset builder does),
    each described with the reader marks the XML holds but the series does not ('xml_issues').

    An XML that names no series is refused unless `matches_ct` says it was made for this CT.
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
    annotations, issues = nodules_lib.place_annotations(reader_xml, series.sop_uids, series.z_positions,
                                                   series.image.GetSpacing()[2])
    clusters = nodules_lib.cluster_annotations(annotations, tol=series.slice_thickness)
    out = []
    for index, cluster in enumerate(clusters):
        mask = nodules_lib.consensus_mask_image(cluster, series.image, consensus_level)
        if mask is None:
            continue
        ratings = nodules_lib.reader_ratings(cluster)[:, -1]
        out.append((mask, {"nodule_index": index, "readers": int(np.count_nonzero(ratings)),
                           "reader_malignancy": [int(r) for r in ratings if r > 0], "xml_issues": list(issues)}))
    if not out:
        raise PredictInputError(f"reader XML {path} marks no nodule >= 3 mm with {consensus_level:.0%} reader "
                                f"agreement in this series.")
    return out


def nodule_masks(ct: sitk.Image, series: Optional[ct_series.CtSeries], *, mask: Optional[str], center, diameter,
                 xml: Optional[str], consensus_level: float, xml_matches_ct: bool = False
                 ) -> list[tuple[sitk.Image, dict]]:
    """(mask, description) of each nodule to predict, from exactly one of mask / center + diameter / xml; a diameter
    or a mask's equivalent-sphere diameter outside DIAMETER_RANGE_MM / MASK_DIAMETER_RANGE_MM is refused."""
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
            point = masks_lib.parse_center(center)
            return [(masks_lib.sphere_mask(ct, point, float(diameter)),
                     {"mask": f"sphere of diameter {float(diameter)} mm at {point.tolist()} mm", "note": SPHERE_NOTE})]
    return [(m, {"mask": f"consensus (>= {consensus_level:.0%} of readers) of reader XML {os.path.abspath(xml)}",
                 **info}) for m, info in xml_masks(xml, series, consensus_level, matches_ct=xml_matches_ct)]

