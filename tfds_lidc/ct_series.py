"""Loads one CT series (a folder of slice DICOM files) into a SimpleITK image in HU."""
from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np
import pydicom
import SimpleITK as sitk

from tfds_lidc.errors import LidcDataError


class SeriesError(LidcDataError, ValueError):
    """The series cannot be used; the message is the reason recorded in the build report."""


@dataclasses.dataclass
class CtSeries:
    """A loaded CT series and the DICOM attributes the builder uses."""
    image: sitk.Image          # int16 HU, axes (x, y, z) in SimpleITK order
    sop_uids: list[str]        # per read slice, in position order (annotations index these slices)
    z_positions: np.ndarray    # ImagePositionPatient z per read slice
    patient_id: str
    study_uid: str
    series_uid: str
    slice_thickness: float
    positions: np.ndarray      # slice positions along the slice normal, sorted, one per read slice (see
                               # acquired_positions: `image` interpolates them when they are uneven)
    notes: list[str]           # what the reader changed (duplicates dropped, interpolation), for the report


def dicom_files(directory: str) -> list[str]:
    """Sorted paths of the folder's .dcm files; without any, of its files with the DICOM preamble (exports from
    scanners and PACS often name slices without an extension), DICOMDIR left out."""
    files = sorted(os.path.join(directory, f) for f in os.listdir(directory))
    named = [f for f in files if f.lower().endswith('.dcm')]
    if named:
        return named
    return [f for f in files if os.path.basename(f).upper() != 'DICOMDIR' and os.path.isfile(f) and _has_preamble(f)]


def _has_preamble(path: str) -> bool:
    """A DICOM Part 10 file: 128 bytes, then 'DICM'."""
    with open(path, 'rb') as f:
        return f.read(132)[128:] == b'DICM'


def _read_slice(path: str) -> tuple[pydicom.Dataset, np.ndarray]:
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float64)
        hu = pixels * float(getattr(ds, 'RescaleSlope', 1.0)) + float(getattr(ds, 'RescaleIntercept', 0.0))
        ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing  # pylint: disable=pointless-statement
    except Exception as e:  # pydicom raises many types on corrupt or truncated files
        raise SeriesError(f'corrupt or truncated DICOM {os.path.basename(path)}: {type(e).__name__}: {e}') from e
    return ds, hu


MAX_GAP_FACTOR = 2.5  # gaps up to 2.5x the median slice spacing (one missing slice) are interpolated
_POSITIONS_KEY = 'lidc_acquired_slice_positions'  # image metadata of an interpolated series


def acquired_positions(image: sitk.Image) -> np.ndarray | None:
    """Positions along the slice normal of the slices a series was read from, when `load_ct_series` interpolated
    them onto `image`'s regular grid (annotations index those slices); None when the image holds them as read."""
    if not image.HasMetaDataKey(_POSITIONS_KEY):
        return None
    return np.array([float(v) for v in image.GetMetaData(_POSITIONS_KEY).split()])


def slice_spacing(positions: np.ndarray, rel_tol: float = 0.05) -> tuple[float, bool]:
    """(median spacing, whether every gap equals it) of sorted, distinct slice positions.

    Raises `SeriesError` when there are fewer than two slices or a gap exceeds MAX_GAP_FACTOR x the median.
    """
    if len(positions) < 2:
        raise SeriesError('fewer than two slices')
    diffs = np.diff(positions)
    spacing = float(np.median(diffs))
    if diffs.max() > MAX_GAP_FACTOR * spacing:
        i = int(np.argmax(diffs))
        raise SeriesError(f'gap of {diffs[i]:.2f} mm after slice position {positions[i]:.2f} mm is more than '
                          f'{MAX_GAP_FACTOR} x the slice spacing ({spacing:.2f} mm)')
    return spacing, bool(np.all(np.abs(diffs - spacing) <= max(rel_tol * spacing, 0.01)))


def grid_count(positions: np.ndarray, spacing: float) -> int:
    """Number of slices of the regular grid from the first to the last position."""
    return int(round((positions[-1] - positions[0]) / spacing)) + 1


def to_grid(values: np.ndarray, positions: np.ndarray, grid_start: float, spacing: float,
            count: int) -> tuple[int, np.ndarray]:
    """Linear interpolation along axis 0 of slices at sorted `positions` onto the regular grid
    grid_start + j * spacing, j < count; returns (first j, float32 slices) for the grid slices that the
    positions span."""
    targets = grid_start + spacing * np.arange(count)
    j = np.flatnonzero((targets >= positions[0] - 1e-6) & (targets <= positions[-1] + 1e-6))
    out = np.empty((len(j),) + values.shape[1:], np.float32)
    for row, t in enumerate(targets[j]):
        i = int(np.clip(np.searchsorted(positions, t, side='right') - 1, 0, max(len(positions) - 2, 0)))
        w = 0.0 if len(positions) < 2 else float(np.clip((t - positions[i]) / (positions[i + 1] - positions[i]), 0, 1))
        out[row] = (1.0 - w) * values[i] + w * values[i + 1] if w > 0 else values[i]
    return (int(j[0]) if len(j) else 0), out


def _drop_duplicates(slices: list, positions: np.ndarray) -> tuple[list, np.ndarray, list[str]]:
    """Sorted slices without exact duplicates (same position and pixels), their positions and notes for the report;
    raises `SeriesError` on two different slices at one position. (An roi on a dropped slice still matches the
    kept one by its z position.)"""
    keep, notes = [0], []
    for i in range(1, len(slices)):
        if positions[i] - positions[keep[-1]] > 1e-3:
            keep.append(i)
            continue
        if not np.array_equal(slices[keep[-1]][1], slices[i][1]):
            raise SeriesError(f'two different slices at position {positions[i]:.2f} mm')
        notes.append(f'duplicate slice at position {positions[i]:.2f} mm dropped')
    return [slices[i] for i in keep], positions[keep], notes


def load_ct_series(directory: str) -> CtSeries:
    """Reads, validates and stacks the slices of a CT series, sorted along the slice normal.

    Exact duplicate slices are dropped; uneven slice positions (or a missing slice) are interpolated linearly
    onto a regular grid at the median spacing, unless a gap exceeds MAX_GAP_FACTOR x that spacing.
    """
    files = dicom_files(directory)
    if not files:
        raise SeriesError('no DICOM files')
    slices = [_read_slice(f) for f in files]
    uids = collections.Counter(str(getattr(ds, 'SeriesInstanceUID', '')) for ds, _ in slices)
    if len(uids) > 1:
        raise SeriesError(f'{len(uids)} series in one folder (SeriesInstanceUID: '
                          f'{", ".join(f"{uid} with {n} slices" for uid, n in uids.most_common())}): '
                          f'one folder must hold one series')
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
    order = np.argsort(positions, kind='stable')
    slices, positions, notes = _drop_duplicates([slices[i] for i in order], positions[order])
    spacing_z, regular = slice_spacing(positions)
    volume = np.stack([hu for _, hu in slices])
    if not regular:
        _, volume = to_grid(volume, positions, positions[0], spacing_z, grid_count(positions, spacing_z))
        notes.append(f'uneven slice positions: {len(slices)} slices interpolated onto {len(volume)} slices '
                     f'{spacing_z:.3f} mm apart')
    volume = np.clip(np.round(volume), -32768, 32767).astype(np.int16)
    image = sitk.GetImageFromArray(volume)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)  # DICOM: (between rows, between columns)
    image.SetSpacing((col_spacing, row_spacing, spacing_z))
    image.SetOrigin(tuple(float(v) for v in slices[0][0].ImagePositionPatient))
    image.SetDirection(tuple(np.stack([row_dir, col_dir, normal], axis=1).ravel()))
    if not regular:
        image.SetMetaData(_POSITIONS_KEY, ' '.join(repr(float(p)) for p in positions))
    sop_uids = [str(ds.SOPInstanceUID) for ds, _ in slices]
    return CtSeries(image=image,
                    sop_uids=sop_uids,
                    z_positions=np.array([float(ds.ImagePositionPatient[2]) for ds, _ in slices]),
                    patient_id=str(getattr(first, 'PatientID', '')),
                    study_uid=str(getattr(first, 'StudyInstanceUID', '')),
                    series_uid=str(getattr(first, 'SeriesInstanceUID', '')),
                    slice_thickness=float(getattr(first, 'SliceThickness', None) or spacing_z),
                    positions=positions, notes=notes)
