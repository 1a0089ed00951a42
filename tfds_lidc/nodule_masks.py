"""A nodule given by a mask file on the CT's grid or by a centre and diameter (a sphere): the masks that predict and
the nodule_table builder both make, with the same checks."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from tfds_lidc import ct_series, image_checks, orientation
from tfds_lidc.errors import LidcDataError

# A lung nodule is at most 30 mm across, a mass up to about 60; below 3 mm LIDC readers mark no nodule outline. A mask's
# equivalent-sphere diameter may fall a little under its longest axis, hence the lower bound for masks.
DIAMETER_RANGE_MM = (3.0, 60.0)
MASK_DIAMETER_RANGE_MM = (2.0, 60.0)
COORDINATES = ("lps", "ras")  # a centre's convention: patient LPS mm (DICOM, LUNA16), or RAS mm (NIfTI tools)
SPHERE_NOTE = ("no segmentation was given: the mask is a sphere of the given diameter around the given centre, so the "
               "radiomic shape features describe that sphere, not the nodule")


class NoduleInputError(LidcDataError, ValueError):
    """A CT or nodule mask file, a centre or a diameter that cannot be used; the message names it and says why."""


def plain(values: Sequence[float], digits: int = 4) -> str:
    """Numbers as plain text, '(512, 512, 128)' (never 'np.int64(512)')."""
    return "(" + ", ".join(f"{round(float(v), digits):g}" for v in values) + ")"


def read_volume(path: str, what: str) -> sitk.Image:
    """sitk.ReadImage of a file whose data length matches its header, else NoduleInputError naming `what`."""
    try:
        image_checks.check_file(path)
        return sitk.ReadImage(path)
    except image_checks.ImageCheckError as e:
        raise NoduleInputError(f"{what} {e}") from e
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise NoduleInputError(f"unreadable {what} {path} (not a NIfTI / NRRD / MetaImage volume): {reason}") from e


def read_ct(path: str, hu_range: Sequence[float] = image_checks.DEFAULT_HU_RANGE, series_uids: Sequence[str] = (),
            around: tuple[Sequence[float], float] | None = None) -> tuple[sitk.Image, ct_series.CtSeries | None]:
    """The CT at `path` in HU, in its stored axis order, and its DICOM series for a folder (the first of
    `series_uids` it holds, else its largest axial CT stack; of a series, only the slices the cube `around` reaches,
    see ct_series.load_ct_series): complete (image_checks) and every value finite and within `hu_range`;
    NoduleInputError naming the path and the reason."""
    if os.path.isdir(path):
        try:
            series = ct_series.load_ct_series(path, series_uids, around)
        except ct_series.SeriesError as e:
            raise NoduleInputError(f"unreadable CT {path}: {e}") from e
        image = series.image
    elif os.path.isfile(path):
        series, image = None, read_volume(path, "CT")
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise NoduleInputError(f"CT {path} is not a 3D scalar volume ({image.GetDimension()}D, "
                                   f"{image.GetNumberOfComponentsPerPixel()} components per voxel).")
    else:
        raise NoduleInputError(f"CT {path} does not exist.")
    try:
        image_checks.check_hounsfield(image, path, hu_range)
    except image_checks.ImageCheckError as e:
        raise NoduleInputError(str(e)) from e
    return image, series


def read_mask(path: str, ct: sitk.Image) -> sitk.Image:
    """A nodule mask file (non-zero = nodule) that lies on the CT's voxel grid; the mask is brought to the CT's axis
    order first, so it may store that grid in another one (predict's CTs are in LPS axis order)."""
    axes = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(ct.GetDirection())
    mask = sitk.DICOMOrient(read_volume(path, "mask"), axes)
    checks = [("size (voxels)", mask.GetSize(), ct.GetSize(), 0.0), ("spacing (mm)", mask.GetSpacing(),
              ct.GetSpacing(), 1e-4), ("origin (mm)", mask.GetOrigin(), ct.GetOrigin(), 1e-3),
              ("direction", mask.GetDirection(), ct.GetDirection(), 1e-4)]
    for what, got, want, tol in checks:
        if len(got) != len(want) or not np.allclose(got, want, rtol=tol, atol=tol):
            raise NoduleInputError(f"mask {path} is not on the CT's grid: its {what} is "
                                   f"{plain(got)}, the CT's is {plain(want)} (both in the CT's axis order, {axes}).")
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    if not voxels:
        raise NoduleInputError(f"mask {path} is empty (no non-zero voxel).")
    volume = voxels * float(np.prod(mask.GetSpacing()))
    diameter = float((6 * volume / np.pi) ** (1 / 3))
    lo, hi = MASK_DIAMETER_RANGE_MM
    if not lo <= diameter <= hi:
        raise NoduleInputError(f"mask {path} holds {voxels} voxels, {volume:.1f} mm^3, a sphere of diameter "
                               f"{diameter:.1f} mm: outside the {lo:g}-{hi:g} mm of a lung nodule or mass "
                               f"(a mask of the whole lung or of a single voxel?).")
    return mask


def sphere_mask(ct: sitk.Image, center_mm: Sequence[float], diameter_mm: float) -> sitk.Image:
    """A ball of `diameter_mm` around the point `center_mm` (x, y, z patient LPS mm), as a sub-block of the CT grid."""
    center = np.asarray(center_mm, np.float64)
    size = np.asarray(ct.GetSize())
    index = np.asarray(ct.TransformPhysicalPointToContinuousIndex(tuple(map(float, center))))
    if np.any(index < -0.5) or np.any(index > size - 0.5):
        bounds = [ct.TransformContinuousIndexToPhysicalPoint(tuple(map(float, c))) for c in (-0.5 * np.ones(3),
                                                                                              size - 0.5)]
        raise NoduleInputError(f"centre {plain(center)} mm is outside the CT volume, which spans "
                               f"{plain(np.minimum(*bounds), 1)} to {plain(np.maximum(*bounds), 1)} mm "
                               f"(patient LPS).")
    radius = diameter_mm / 2
    reach = radius / np.asarray(ct.GetSpacing()) + 1
    lo = np.clip(np.floor(index - reach), 0, size - 1).astype(int)
    hi = np.clip(np.ceil(index + reach), 0, size - 1).astype(int)
    xx, yy, zz = np.meshgrid(*(np.arange(a, b + 1) for a, b in zip(lo, hi)), indexing="ij")
    idx = np.stack([xx, yy, zz], -1).reshape(-1, 3)
    direction = np.asarray(ct.GetDirection()).reshape(3, 3)
    points = np.asarray(ct.GetOrigin()) + (idx * np.asarray(ct.GetSpacing())) @ direction.T
    inside = (np.linalg.norm(points - center, axis=1) <= radius).reshape(xx.shape)
    if not inside.any():
        raise NoduleInputError(f"a sphere of diameter {diameter_mm:g} mm at {plain(center)} holds no voxel centre "
                               f"of the CT (spacing {plain(ct.GetSpacing())} mm); give a larger --diameter.")
    mask = sitk.GetImageFromArray(inside.transpose(2, 1, 0).astype(np.uint8))
    mask.SetSpacing(ct.GetSpacing())
    mask.SetDirection(ct.GetDirection())
    mask.SetOrigin(ct.TransformIndexToPhysicalPoint(tuple(int(v) for v in lo)))
    return mask


def parse_center(center, coordinates: str = "lps") -> np.ndarray:
    """The centre x,y,z ('x,y,z' or three values) as patient LPS mm, given in `coordinates` ('lps' or 'ras');
    NoduleInputError otherwise."""
    if coordinates not in COORDINATES:
        raise NoduleInputError(f"coordinates {coordinates!r}: use 'lps' (patient LPS mm, as DICOM and LUNA16) or "
                               f"'ras' (RAS mm, as NIfTI tools and 3D Slicer).")
    try:
        values = [float(v) for v in (center.split(",") if isinstance(center, str) else center)]
    except (TypeError, ValueError) as e:
        raise NoduleInputError(f"--center {center!r}: expected x,y,z in mm.") from e
    if len(values) != 3:
        raise NoduleInputError(f"--center {center!r}: expected three numbers x,y,z in mm, got {len(values)}.")
    return orientation.ras_to_lps(values) if coordinates == "ras" else np.asarray(values)
