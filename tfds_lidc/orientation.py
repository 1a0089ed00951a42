"""One orientation for every CT: patient LPS, DICOM's and LIDC-IDRI's convention (x towards the patient's Left, y
towards Posterior, z towards Superior), whatever axes a DICOM series, NIfTI, NRRD or MetaImage file stores.

A volume is put in LPS axis order by its direction cosines (`to_lps`: axis flips and permutations, exact, no
interpolation). Crops are sampled on grids along the LPS axes (`crop.nodule_grid`), which resamples what is left of an
oblique direction (a gantry tilt), once. So the same scan stored in any orientation gives the same crop.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

AXIS_TOLERANCE = 1e-4   # direction cosines this close to a signed unit vector count as axis-aligned
# The end of each LPS axis a crop's first and last index lie at, for the crop's (z, y, x) array axes.
CROP_AXIS_ENDS = (('I', 'S'), ('A', 'P'), ('R', 'L'))


def is_lps(image: sitk.Image) -> bool:
    """Whether the image's axes run along L, P and S (within AXIS_TOLERANCE)."""
    return bool(np.allclose(np.reshape(image.GetDirection(), (3, 3)), np.eye(3), atol=AXIS_TOLERANCE))


def to_lps(image: sitk.Image) -> sitk.Image:
    """The image with its axes flipped and permuted to run along L, P, S (sitk.DICOMOrient: voxels moved, not
    interpolated); the image itself when they already do. An oblique direction keeps its remainder (the nearest
    axes are chosen); crops resample it."""
    if is_lps(image):
        return image
    return sitk.DICOMOrient(image, 'LPS')


def ras_to_lps(point_mm: Sequence[float]) -> np.ndarray:
    """A point in patient RAS millimetres (NIfTI tools, 3D Slicer) as LPS millimetres: x and y change sign."""
    return np.asarray(point_mm, np.float64) * (-1.0, -1.0, 1.0)


def view_letters(row_axis: int, column_axis: int) -> tuple[str, str, str, str]:
    """(top, bottom, left, right) patient directions of a 2D picture of an LPS crop whose rows run along the crop's
    (z, y, x) array axis `row_axis` and columns along `column_axis`, drawn with row 0 at the top."""
    (top, bottom), (left, right) = CROP_AXIS_ENDS[row_axis], CROP_AXIS_ENDS[column_axis]
    return top, bottom, left, right
