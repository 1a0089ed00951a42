"""Checks of a CT or mask volume before predict uses it: the file holds all the voxels its header promises with a
positive, finite spacing, and (for a CT) every value is finite and within a plausible Hounsfield range.

SimpleITK refuses a truncated NRRD or MetaImage file itself, and a zero spacing in memory, but zero-fills a truncated
NIfTI (.nii or .nii.gz) and reads a zero or non-finite NIfTI pixdim as 1 mm: so NIfTI headers are checked here.
"""

from __future__ import annotations

import gzip
import zlib
from typing import Sequence

import numpy as np
import SimpleITK as sitk

# Air is -1000 HU; scanners pad outside the field of view with -1024, -2048 or -3024; dense bone and contrast reach a
# few thousand, metal more (extended-scale scans). Outside this range the file is most likely not in HU.
DEFAULT_HU_RANGE = (-3100.0, 5000.0)
_NIFTI1_HEADER = 348
_CHUNK = 1 << 20


class ImageCheckError(ValueError):
    """A volume file that does not hold what its header says, or whose geometry or values cannot be a CT's."""


def _data_length(path: str) -> tuple[bytes, int]:
    """(first 348 bytes, total length) of the file's content, decompressed for .gz; a cut gzip stream ends early."""
    opener = gzip.open if path.endswith(".gz") else open
    head, total = b"", 0
    with opener(path, "rb") as f:
        try:
            while chunk := f.read(_CHUNK):
                if len(head) < _NIFTI1_HEADER:
                    head += chunk[:_NIFTI1_HEADER - len(head)]
                total += len(chunk)
        except (EOFError, zlib.error, gzip.BadGzipFile):  # truncated or corrupt stream: what was read is what exists
            pass
    return head, total


def check_nifti(path: str) -> None:
    """ImageCheckError unless a NIfTI-1 file holds vox_offset + prod(dims) * bitpix / 8 bytes and its spatial pixdims
    are positive and finite."""
    head, total = _data_length(path)
    if len(head) < _NIFTI1_HEADER:
        raise ImageCheckError(f"{path} is shorter than a NIfTI header ({total} bytes).")
    for order in "<>":
        if np.frombuffer(head, f"{order}i4", 1, 0)[0] == _NIFTI1_HEADER:
            break
    else:
        return  # NIfTI-2 or not NIfTI: SimpleITK's own reading decides
    dim = np.frombuffer(head, f"{order}i2", 8, 40).astype(np.int64)
    bitpix = int(np.frombuffer(head, f"{order}i2", 1, 72)[0])
    vox_offset = int(np.frombuffer(head, f"{order}f4", 1, 108)[0])
    ndim = int(dim[0])
    if not 1 <= ndim <= 7 or bitpix <= 0 or np.any(dim[1:ndim + 1] < 1):
        raise ImageCheckError(f"{path} has an invalid NIfTI header (dim {dim.tolist()}, bitpix {bitpix}).")
    pixdim = np.frombuffer(head, f"{order}f4", 8, 76)[1:min(ndim, 3) + 1].astype(np.float64)
    if not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0)):
        raise ImageCheckError(f"{path} has voxel spacing (NIfTI pixdim) {pixdim.tolist()} mm; every spacing must be "
                              f"positive and finite.")
    expected = max(vox_offset, _NIFTI1_HEADER) + int(np.prod(dim[1:ndim + 1])) * bitpix // 8
    if total < expected:
        raise ImageCheckError(f"{path} is truncated: its header promises {expected} bytes "
                              f"({'x'.join(str(int(d)) for d in dim[1:ndim + 1])} voxels of {bitpix} bits after "
                              f"{vox_offset} header bytes), the file holds {total}"
                              f"{' after decompression' if path.endswith('.gz') else ''}.")


def check_file(path: str) -> None:
    """The checks of the file itself that SimpleITK does not make (NIfTI data length and spacing)."""
    if path.endswith((".nii", ".nii.gz")):
        check_nifti(path)


def check_hounsfield(image: sitk.Image, path: str, hu_range: Sequence[float] = DEFAULT_HU_RANGE) -> None:
    """ImageCheckError unless every voxel is finite and within `hu_range` (HU)."""
    lo, hi = (float(v) for v in hu_range)
    values = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(values)
    if not finite.all():
        raise ImageCheckError(f"{path} holds {int(values.size - np.count_nonzero(finite))} non-finite voxel values "
                              f"(NaN or infinite).")
    vmin, vmax = float(values.min()), float(values.max())
    if vmin < lo or vmax > hi:
        raise ImageCheckError(f"{path} has values from {vmin:g} to {vmax:g}, outside the plausible CT range "
                              f"[{lo:g}, {hi:g}] HU: it is not in Hounsfield units, or give a wider --hu_range.")
