"""Loads one CT series (a folder of slice DICOM files) into a SimpleITK image in HU."""
from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import pydicom
import pydicom.pixels
import SimpleITK as sitk

from tfds_lidc.errors import LidcDataError


class SeriesError(LidcDataError, ValueError):
    """The series cannot be used; the message is the reason recorded in the build report."""


class DecoderMissingError(SeriesError):
    """The slices' transfer syntax needs a pixel-data decoder that this installation lacks: a fault of the
    environment, not of the series, so the build does not remember it (a run after the install reads the series)."""


@dataclasses.dataclass
class CtSeries:
    """A loaded CT series and the DICOM attributes the builder uses."""
    image: sitk.Image          # int16 HU, axes (x, y, z) in SimpleITK order as acquired: (column, row, slice), the
                               # grid reader marks index (crops are sampled along LPS, see tfds_lidc.orientation)
    sop_uids: list[str]        # per read slice, in position order (annotations index these slices)
    z_positions: np.ndarray    # ImagePositionPatient z per read slice
    patient_id: str
    study_uid: str
    series_uid: str
    slice_thickness: float
    positions: np.ndarray      # slice positions along the slice normal, sorted, one per read slice (see
                               # acquired_positions: `image` interpolates them when they are uneven)
    notes: list[str]           # what the reader changed (duplicates dropped, interpolation), for the report
    files_ignored: list[dict[str, str]] = dataclasses.field(default_factory=list)  # {'file', 'reason'}: the
                               # folder's other files (localizers, other series, reports), each with why
    slices_not_read: int = 0   # slices of the series outside the part read (load_ct_series' `around`)


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


_CT_IMAGE_STORAGE = (pydicom.uid.CTImageStorage, pydicom.uid.EnhancedCTImageStorage,
                     pydicom.uid.LegacyConvertedEnhancedCTImageStorage)


def _read_header(path: str) -> pydicom.Dataset:
    """The file's data set, its pixel data left on disk until used."""
    name = os.path.basename(path)
    try:
        ds = pydicom.dcmread(path, defer_size=4096)
    except Exception as e:  # pydicom raises many types on corrupt or truncated files
        raise SeriesError(f'corrupt or truncated DICOM {name}: {type(e).__name__}: {e}') from e
    sop_class = ds.get('SOPClassUID', ds.file_meta.get('MediaStorageSOPClassUID'))
    if sop_class in _CT_IMAGE_STORAGE and 'PixelData' not in ds:  # pydicom reads a cut file up to where it ends
        raise SeriesError(f'corrupt or truncated DICOM {name}: a CT image without pixel data')
    return ds


def _install_hint(missing: list[str]) -> str:
    """pydicom's missing plugin dependencies ('pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0') as
    what to pip install."""
    options = [m.split(' - requires ', 1)[-1].replace('gdcm>=', 'python-gdcm>=') for m in missing]
    return ' or '.join(options) or 'a pydicom pixel-data plugin for it'


def _check_decodable(ds: pydicom.Dataset, name: str) -> None:
    """DecoderMissingError naming the transfer syntax and what to install when no installed plugin decodes the
    slice's pixel data; SeriesError when no DICOM decoder for Python reads that syntax at all."""
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:
        return
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
    except NotImplementedError as e:
        raise SeriesError(f'no DICOM decoder for Python reads transfer syntax {syntax.name} ({syntax}), the pixel '
                          f'data of {name}') from e
    if not decoder.is_available:
        raise DecoderMissingError(f'no installed decoder reads transfer syntax {syntax.name} ({syntax}), the pixel '
                                  f'data of {name}; install {_install_hint(decoder.missing_dependencies)}')


def _hounsfield(path: str, ds: pydicom.Dataset) -> np.ndarray:
    """The slice in HU, exactly: int32 when the rescale is integral (CT's usual slope 1 and intercept -1024), which
    keeps a whole series out of float64 (several times the memory traffic), else float64."""
    name = os.path.basename(path)
    _check_decodable(ds, name)
    try:
        pixels = ds.pixel_array
    except Exception as e:  # pylint: disable=broad-except  # pydicom and its plugins raise many types on bad data
        raise SeriesError(f'corrupt or truncated DICOM {name}: {type(e).__name__}: {e}') from e
    slope, intercept = float(getattr(ds, 'RescaleSlope', 1.0)), float(getattr(ds, 'RescaleIntercept', 0.0))
    if slope.is_integer() and intercept.is_integer() and abs(slope) * 2**16 + abs(intercept) < 2**31:
        return pixels.astype(np.int32) * int(slope) + int(intercept)
    return pixels.astype(np.float64) * slope + intercept


def _to_int16(hu: np.ndarray) -> np.ndarray:
    """HU values rounded to the nearest integer and clipped to int16."""
    return np.clip(np.round(hu), -32768, 32767).astype(np.int16)


_SECONDARY_CAPTURE = '1.2.840.10008.5.1.4.1.1.7'  # and its multi-frame variants below it


def _not_a_ct_slice(ds: pydicom.Dataset) -> str:
    """Why a file is no slice of a CT stack ('' when it may be one)."""
    if 'PixelData' not in ds:
        return f'no image ({getattr(ds, "SOPClassUID", pydicom.uid.UID("")).name or "unknown SOP class"})'
    modality = str(getattr(ds, 'Modality', 'CT'))
    if modality != 'CT':
        return f'not CT (modality {modality})'
    if 'LOCALIZER' in [str(v).upper() for v in getattr(ds, 'ImageType', [])]:
        return 'localizer (scout) image'
    if str(getattr(ds, 'SOPClassUID', '')).startswith(_SECONDARY_CAPTURE):
        return 'secondary capture (a picture, not a CT slice)'
    if not all(hasattr(ds, k) for k in ('ImagePositionPatient', 'ImageOrientationPatient', 'PixelSpacing')):
        return 'no slice geometry (ImagePositionPatient, ImageOrientationPatient or PixelSpacing missing)'
    return ''


def _is_axial(ds: pydicom.Dataset) -> bool:
    orientation = np.asarray(ds.ImageOrientationPatient, np.float64)
    return abs(np.cross(orientation[:3], orientation[3:])[2]) > 0.9


def _choose_series(headers: dict[str, pydicom.Dataset], series_uids: Sequence[str]
                   ) -> tuple[str, list[str], list[dict[str, str]]]:
    """(series UID, its files, the other files with why they are left out) of a folder's headers {path: data set}:
    the first of `series_uids` (a reader XML's or the user's choice) the folder holds, else its largest axial CT
    stack (its largest CT stack when none is axial)."""
    ignored, stacks = [], collections.defaultdict(list)
    for path, ds in headers.items():
        reason = _not_a_ct_slice(ds)
        if reason:
            ignored.append({'file': os.path.basename(path), 'reason': reason})
        else:
            stacks[str(getattr(ds, 'SeriesInstanceUID', ''))].append(path)
    if not stacks:
        kinds = collections.Counter(i['reason'] for i in ignored)
        raise SeriesError('no CT slice: ' + '; '.join(f'{n} x {k}' for k, n in kinds.most_common()))
    held = ', '.join(f'{uid} ({len(files)} slices)' for uid, files in stacks.items())
    if series_uids:
        chosen = next((uid for uid in series_uids if uid in stacks), None)
        if chosen is None:
            raise SeriesError(f'no slice of series {" or ".join(series_uids)} in the folder; it holds {held}')
        why = 'the series chosen is ' + chosen
    else:
        chosen = max(stacks, key=lambda uid: (_is_axial(headers[stacks[uid][0]]), len(stacks[uid]), uid))
        why = f'the largest {"axial " if _is_axial(headers[stacks[chosen][0]]) else ""}CT stack is {chosen}'
    for uid, files in stacks.items():
        if uid != chosen:
            ignored += [{'file': os.path.basename(p), 'reason': f'another series ({uid}, {len(files)} slices; {why})'}
                        for p in files]
    return chosen, sorted(stacks[chosen]), sorted(ignored, key=lambda i: i['file'])


def _check_same_geometry(headers: dict[str, pydicom.Dataset], files: list[str]) -> None:
    """SeriesError naming the slices whose orientation, size or pixel spacing differ from most of the series'."""
    def geometry(ds):
        return (tuple(round(float(v), 4) for v in ds.ImageOrientationPatient), (int(ds.Rows), int(ds.Columns)),
                tuple(round(float(v), 4) for v in ds.PixelSpacing))
    shapes = {path: geometry(headers[path]) for path in files}
    common = collections.Counter(shapes.values()).most_common(1)[0][0]
    odd = [path for path in files if shapes[path] != common]
    if odd:
        names = ['orientation', 'size', 'pixel spacing']
        first = shapes[odd[0]]
        what = ', '.join(f'{n} {a} (the others: {b})' for n, a, b in zip(names, first, common) if a != b)
        raise SeriesError(f'slices differ from the others in orientation, size or pixel spacing: {len(odd)} of '
                          f'{len(files)}, {", ".join(os.path.basename(p) for p in odd[:5])}'
                          f'{" ..." if len(odd) > 5 else ""} ({os.path.basename(odd[0])}: {what})')


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


def _slab(files: list[str], headers: dict[str, pydicom.Dataset], positions: np.ndarray, normal: np.ndarray,
          around: tuple[Sequence[float], float]) -> tuple[int, int, float] | None:
    """(first, end, slice spacing) of the position-sorted slices that an LPS-aligned cube (centre in patient mm,
    half side in mm) reaches along the slice normal, with one more slice either side for interpolation. None when
    the whole series is to be read: its positions repeat or are uneven (the full read drops or interpolates those
    slices, and its grid would differ), or the centre is outside the series (whose bounds the nodule's check names).
    """
    if len(positions) < 2 or np.diff(positions).min() <= 1e-3:
        return None
    spacing, regular = slice_spacing(positions)
    if not regular:
        return None
    first = headers[files[0]]
    centre, half_side = np.asarray(around[0], np.float64), float(around[1])
    axes = np.stack([np.asarray(first.ImageOrientationPatient[:3], np.float64),
                     np.asarray(first.ImageOrientationPatient[3:], np.float64), normal], axis=1)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    index = axes.T @ (centre - np.asarray(first.ImagePositionPatient, np.float64)) / (col_spacing, row_spacing,
                                                                                        spacing)
    if np.any(index < -0.5) or np.any(index > np.array([first.Columns, first.Rows, len(files)]) - 0.5):
        return None
    reach = half_side * np.abs(normal).sum() / spacing + 1
    return max(int(np.floor(index[2] - reach)), 0), min(int(np.ceil(index[2] + reach)) + 1, len(files)), spacing


def load_ct_series(directory: str, series_uids: Sequence[str] = (),
                   around: tuple[Sequence[float], float] | None = None) -> CtSeries:
    """Reads, validates and stacks the slices of the folder's CT series, sorted along the slice normal.

    The series is the first of `series_uids` (a reader XML's or the user's choice) that the folder holds, else its
    largest axial CT stack; every other file (a localizer, another series, a dose report, a secondary capture) is
    left out and listed with why in `files_ignored`. Exact duplicate slices are dropped; uneven slice positions (or
    a missing slice) are interpolated linearly onto a regular grid at the median spacing, unless a gap exceeds
    MAX_GAP_FACTOR x that spacing.

    With `around` (centre x, y, z in patient LPS mm, half side in mm), a series of evenly spaced slices is read only
    where that cube reaches: the image is the part of the whole series' grid those slices span, and the slices not
    read are counted in `slices_not_read` (see `_slab` for when the whole series is read anyway).
    """
    files = dicom_files(directory)
    if not files:
        raise SeriesError('no DICOM files')
    headers = {path: _read_header(path) for path in files}
    series_uid, files, ignored = _choose_series(headers, series_uids)
    _check_same_geometry(headers, files)
    first = headers[files[0]]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([np.dot(np.asarray(headers[p].ImagePositionPatient, np.float64), normal) for p in files])
    order = np.argsort(positions, kind='stable')
    files, positions = [files[i] for i in order], positions[order]
    slab = None if around is None else _slab(files, headers, positions, normal, around)
    origin = np.asarray(headers[files[0]].ImagePositionPatient, np.float64)
    if slab is None:
        slices, positions, notes = _drop_duplicates([(headers[p], _hounsfield(p, headers[p])) for p in files],
                                                    positions)
        spacing_z, regular = slice_spacing(positions)
        not_read = 0
    else:
        start, end, spacing_z = slab
        slices = [(headers[p], _hounsfield(p, headers[p])) for p in files[start:end]]
        positions, notes, regular, not_read = positions[start:end], [], True, len(files) - (end - start)
        origin = origin + normal * (spacing_z * start)  # the whole series' grid, as its full read places it
    if regular:  # slice by slice: each conversion stays in the cache
        volume = np.stack([_to_int16(hu) for _, hu in slices])
    else:
        _, on_grid = to_grid(np.stack([hu for _, hu in slices]), positions, positions[0], spacing_z,
                             grid_count(positions, spacing_z))
        volume = _to_int16(on_grid)
        notes.append(f'uneven slice positions: {len(slices)} slices interpolated onto {len(volume)} slices '
                     f'{spacing_z:.3f} mm apart')
    image = sitk.GetImageFromArray(volume)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)  # DICOM: (between rows, between columns)
    image.SetSpacing((col_spacing, row_spacing, spacing_z))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(np.stack([row_dir, col_dir, normal], axis=1).ravel()))
    if not regular:
        image.SetMetaData(_POSITIONS_KEY, ' '.join(repr(float(p)) for p in positions))
    sop_uids = [str(ds.SOPInstanceUID) for ds, _ in slices]
    return CtSeries(image=image,
                    sop_uids=sop_uids,
                    z_positions=np.array([float(ds.ImagePositionPatient[2]) for ds, _ in slices]),
                    patient_id=str(getattr(first, 'PatientID', '')),
                    study_uid=str(getattr(first, 'StudyInstanceUID', '')),
                    series_uid=series_uid,
                    slice_thickness=float(getattr(first, 'SliceThickness', None) or spacing_z),
                    positions=positions, notes=notes, files_ignored=ignored, slices_not_read=not_read)
