"""Crop, mask, radiomics and size of one nodule: the single code path of the builder and of predict."""
from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from tfds_lidc import crop
from tfds_lidc import orientation
from tfds_lidc import radiomics_features
from tfds_lidc.errors import LidcDataError


class NoduleError(LidcDataError, ValueError):
    """The nodule cannot be used (a fault of its data, not of the code); the message is the reason reported."""


@dataclasses.dataclass
class NoduleSample:
    ct: np.ndarray              # int16 [S, S, S] HU, (z, y, x), air-padded
    mask: np.ndarray            # uint8 [S, S, S]
    radiomics: np.ndarray       # float32 [F], radiomics_features.feature_names() order
    centroid_mm: np.ndarray     # float32 [3] (x, y, z) patient LPS mm
    diameter_mm: float          # longest axial diameter of the mask
    volume_mm3: float
    padded: bool                # the crop reaches outside the scan
    roi_ct: sitk.Image          # isotropic region given to pyradiomics (holds the whole mask)
    roi_mask: sitk.Image


def centroid_mm(mask: sitk.Image) -> np.ndarray:
    """Centre of mass of a binary mask in physical (x, y, z) coordinates."""
    zyx = np.argwhere(sitk.GetArrayViewFromImage(mask)).mean(0)
    return np.asarray(mask.TransformContinuousIndexToPhysicalPoint(tuple(map(float, zyx[::-1]))))


def axial_diameter_mm(mask: sitk.Image) -> float:
    """Longest distance between pixel corners of the mask within one slice, over all slices."""
    arr = sitk.GetArrayViewFromImage(mask)
    sx, sy = mask.GetSpacing()[:2]
    corners = np.array([[-.5, -.5], [-.5, .5], [.5, -.5], [.5, .5]])
    best = 0.0
    for z in np.flatnonzero(arr.reshape(arr.shape[0], -1).any(1)):
        yx = np.argwhere(arr[z])
        pts = ((yx[:, None, ::-1] + corners[None]) * (sx, sy)).reshape(-1, 2)
        try:
            pts = pts[ConvexHull(pts).vertices]
        except QhullError:
            pass
        best = max(best, float(pdist(pts).max()))
    return best


def nodule_example(ct: sitk.Image, mask: sitk.Image, *, crop_size: int = 64, spacing_mm: float = 1.0,
                   radiomics_params: str = radiomics_features.DEFAULT_PARAMS) -> NoduleSample:
    """Computes the dataset example of one nodule.

    Args:
      ct: CT volume in HU, in any orientation (the crop is sampled along the patient LPS axes).
      mask: binary nodule mask (on the CT's grid or any other), in any orientation; its axes are put in LPS order
        (orientation.to_lps) so that the diameter is measured in axial slices.
      crop_size: side of the cubic crop in voxels.
      spacing_mm: isotropic voxel size of the crop.
      radiomics_params: pyradiomics parameter YAML.

    Returns:
      The crop centred on the mask's centroid, the mask on the same grid, pyradiomics features of the
      isotropic CT and the WHOLE isotropic mask (not cut by the crop), centroid, diameter and volume.
    """
    mask = orientation.to_lps(sitk.Cast(mask > 0, sitk.sitkUInt8))
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    if voxels == 0:
        raise NoduleError('empty nodule mask')
    centre = centroid_mm(mask)
    grid, offset = crop.nodule_grid(mask, centre, crop_size, spacing_mm)
    roi_ct = crop.resample_ct(ct, grid)
    roi_mask = crop.resample_mask(mask, grid)
    if not sitk.GetArrayViewFromImage(roi_mask).any():
        raise NoduleError('nodule mask vanishes at the isotropic spacing')
    try:
        features = radiomics_features.extract(roi_ct, roi_mask, radiomics_params)
    except ValueError as e:  # pyradiomics' own checks of the mask (too small, too few dimensions, ...)
        raise NoduleError(f'pyradiomics refuses the mask: {e}') from e
    names = radiomics_features.feature_names(radiomics_params)
    if tuple(features) != names:
        raise RuntimeError('pyradiomics returned features in an unexpected order')
    # The crop reaches outside the scan when one of its corners maps outside the CT's index range.
    ct_crop = crop.central_crop(sitk.GetArrayFromImage(roi_ct), offset, crop_size)
    direction = np.asarray(grid.direction).reshape(3, 3)
    first = np.asarray(grid.origin) + direction @ (offset * spacing_mm)
    corners = [first + direction @ (np.array(c) * (crop_size - 1) * spacing_mm) for c in np.ndindex(2, 2, 2)]
    inside = [np.all((0 <= (idx := np.asarray(ct.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))))))
                     & (idx <= np.asarray(ct.GetSize()) - 1)) for p in corners]
    return NoduleSample(
        ct=ct_crop,
        mask=crop.central_crop(sitk.GetArrayFromImage(roi_mask), offset, crop_size),
        radiomics=np.array([features[n] for n in names], dtype=np.float32),
        centroid_mm=centre.astype(np.float32),
        diameter_mm=axial_diameter_mm(mask),
        volume_mm3=float(voxels * np.prod(mask.GetSpacing())),
        padded=not all(inside),
        roi_ct=roi_ct,
        roi_mask=roi_mask)
