"""Loads one CT series (a folder of slice DICOM files) into a SimpleITK image in HU."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pydicom
import SimpleITK as sitk


class SeriesError(ValueError):
    """The series cannot be used; the message is the reason recorded in the build report."""


@dataclasses.dataclass
class CtSeries:
    """A loaded CT series and the DICOM attributes the builder uses."""
    image: sitk.Image          # int16 HU, axes (x, y, z) in SimpleITK order
    sop_uids: list[str]        # per slice, in image z order
    z_positions: np.ndarray    # ImagePositionPatient z per slice, in image z order
    patient_id: str
    study_uid: str
    series_uid: str
    slice_thickness: float


def dicom_files(directory: str) -> list[str]:
    """Sorted paths of the folder's .dcm files."""
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.lower().endswith('.dcm'))


def _read_slice(path: str) -> tuple[pydicom.Dataset, np.ndarray]:
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float64)
        hu = pixels * float(getattr(ds, 'RescaleSlope', 1.0)) + float(getattr(ds, 'RescaleIntercept', 0.0))
        ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing  # pylint: disable=pointless-statement
    except Exception as e:  # pydicom raises many types on corrupt or truncated files
        raise SeriesError(f'corrupt or truncated DICOM {os.path.basename(path)}: {type(e).__name__}: {e}') from e
    return ds, hu


def check_spacing(positions: np.ndarray, rel_tol: float = 0.05) -> float:
    """Returns the slice spacing of sorted slice positions; raises `SeriesError` if uneven."""
    if len(positions) < 2:
        raise SeriesError('fewer than two slices')
    diffs = np.diff(positions)
    spacing = float(np.median(diffs))
    if np.any(diffs <= 1e-3):
        raise SeriesError(f'duplicate slice position at {positions[1:][diffs <= 1e-3][0]:.2f} mm')
    tol = max(rel_tol * spacing, 0.01)
    gaps = np.abs(diffs - np.round(diffs / spacing) * spacing) <= tol
    missing = gaps & (np.round(diffs / spacing) >= 2)
    if np.any(missing):
        i = int(np.argmax(missing))
        raise SeriesError(f'missing slice: gap of {diffs[i]:.2f} mm after position {positions[i]:.2f} mm '
                          f'(spacing {spacing:.2f} mm)')
    uneven = np.abs(diffs - spacing) > tol
    if np.any(uneven):
        i = int(np.argmax(uneven))
        raise SeriesError(f'uneven slice spacing: {diffs[i]:.3f} mm after position {positions[i]:.2f} mm '
                          f'(median {spacing:.3f} mm)')
    return spacing


def load_ct_series(directory: str) -> CtSeries:
    """Reads, validates and stacks the slices of a CT series, sorted along the slice normal."""
    files = dicom_files(directory)
    if not files:
        raise SeriesError('no DICOM files')
    slices = [_read_slice(f) for f in files]
    first = slices[0][0]
    if str(getattr(first, 'Modality', 'CT')) != 'CT':
        raise SeriesError(f'not a CT series (modality {first.Modality})')
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    for ds, hu in slices:
        if (not np.allclose(ds.ImageOrientationPatient, orientation, atol=1e-4)
            or hu.shape != slices[0][1].shape
                or not np.allclose(ds.PixelSpacing, first.PixelSpacing, atol=1e-4)):
            raise SeriesError('slices differ in orientation, size or pixel spacing')
    positions = np.array([np.dot(np.asarray(ds.ImagePositionPatient, np.float64), normal) for ds, _ in slices])
    order = np.argsort(positions)
    slices = [slices[i] for i in order]
    spacing_z = check_spacing(positions[order])
    volume = np.stack([np.clip(np.round(hu), -32768, 32767) for _, hu in slices]).astype(np.int16)
    image = sitk.GetImageFromArray(volume)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)  # DICOM: (between rows, between columns)
    image.SetSpacing((col_spacing, row_spacing, spacing_z))
    image.SetOrigin(tuple(float(v) for v in slices[0][0].ImagePositionPatient))
    image.SetDirection(tuple(np.stack([row_dir, col_dir, normal], axis=1).ravel()))
    return CtSeries(image=image,
                    sop_uids=[str(ds.SOPInstanceUID) for ds, _ in slices],
                    z_positions=np.array([float(ds.ImagePositionPatient[2]) for ds, _ in slices]),
                    patient_id=str(getattr(first, 'PatientID', '')),
                    study_uid=str(getattr(first, 'StudyInstanceUID', '')),
                    series_uid=str(getattr(first, 'SeriesInstanceUID', '')),
                    slice_thickness=float(getattr(first, 'SliceThickness', None) or spacing_z))
