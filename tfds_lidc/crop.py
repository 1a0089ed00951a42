"""Isotropic resampling of a CT region around a nodule and fixed-size cropping (air padding)."""
from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk

AIR_HU = -1000


@dataclasses.dataclass(frozen=True)
class Grid:
    """An isotropic grid (crops use grids along the patient LPS axes, see `nodule_grid`)."""
    origin: tuple[float, float, float]
    size: tuple[int, int, int]           # (x, y, z) voxels
    spacing: float
    direction: tuple[float, ...]

    def reference(self) -> sitk.Image:
        """An empty image on this grid, the reference of `sitk.Resample`."""
        ref = sitk.Image([int(s) for s in self.size], sitk.sitkUInt8)
        ref.SetOrigin(self.origin)
        ref.SetSpacing((self.spacing,) * 3)
        ref.SetDirection(self.direction)
        return ref


def nodule_grid(mask: sitk.Image, centre_mm: np.ndarray, crop_size: int, spacing: float,
                margin_mm: float = 2.0) -> tuple[Grid, np.ndarray]:
    """Grid along the patient LPS axes, centred on `centre_mm`, holding the `crop_size`^3 crop and, around it, the
    whole mask.

    Along LPS whatever the scan's own axes: a scan stored flipped or with permuted axes gives the same crop (the same
    points sampled), an oblique one is resampled here (see `tfds_lidc.orientation`).
    Returns the grid and the (x, y, z) voxel offset of the crop inside it.
    """
    direction = np.eye(3)
    arr = sitk.GetArrayViewFromImage(mask)
    zyx = np.argwhere(arr)
    lo, hi = zyx.min(0)[::-1] - 0.5, zyx.max(0)[::-1] + 0.5   # (x, y, z) continuous index extent
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    phys = np.array([mask.TransformContinuousIndexToPhysicalPoint(tuple(map(float, p))) for p in corners])
    extent = np.abs((phys - centre_mm) @ direction).max(0) + margin_mm   # along the grid axes
    half_crop = crop_size * spacing / 2
    pad = np.maximum(np.ceil((extent - half_crop) / spacing), 0).astype(int)
    size = crop_size + 2 * pad
    origin = centre_mm - direction @ (((size - 1) / 2) * spacing)
    return Grid(tuple(map(float, origin)), tuple(map(int, size)), float(spacing),
                tuple(map(float, direction.ravel()))), pad


def resample_ct(ct: sitk.Image, grid: Grid) -> sitk.Image:
    """Linear resampling of HU onto the grid, rounded to int16, air outside the scan. The int16 CT is interpolated
    as it is (ITK computes in double either way): a float32 copy of the whole series per nodule cost 0.07 s and
    315 MB for a 300-slice series."""
    out = sitk.Resample(ct, grid.reference(), sitk.Transform(), sitk.sitkLinear, float(AIR_HU), sitk.sitkFloat32)
    arr = np.round(sitk.GetArrayFromImage(out)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(out)
    return img


def resample_mask(mask: sitk.Image, grid: Grid) -> sitk.Image:
    """Linear resampling of a binary mask onto the grid, thresholded at 0.5."""
    out = sitk.Resample(sitk.Cast(mask > 0, sitk.sitkFloat32), grid.reference(), sitk.Transform(),
                        sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    binary = sitk.Cast(out >= 0.5, sitk.sitkUInt8)
    binary.CopyInformation(out)
    return binary


def central_crop(arr: np.ndarray, pad: np.ndarray, crop_size: int) -> np.ndarray:
    """The crop_size^3 block of a (z, y, x) array at the (x, y, z) voxel offset `pad`."""
    z, y, x = pad[::-1]
    return arr[z:z + crop_size, y:y + crop_size, x:x + crop_size]
