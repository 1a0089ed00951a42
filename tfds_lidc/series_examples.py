"""From one series folder to its nodule examples and its build report entry."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import numpy as np

from tfds_lidc import ct_series
from tfds_lidc import nodule_sample
from tfds_lidc import nodules as nodules_lib
from tfds_lidc import report
from tfds_lidc import xml_reader

LABEL_NAMES = ('benign', 'unsure', 'malignant')
_PATIENT_RE = re.compile(r'LIDC-IDRI-\d+')


@dataclasses.dataclass(frozen=True)
class SeriesTask:
    """One series to convert; plain data so that it pickles for process pools and Beam."""
    manual_dir: str
    series_dir: str          # relative to manual_dir
    patient_id: str
    split: str
    fold: int
    crop_size: int
    spacing_mm: float
    consensus_level: float
    radiomics_params: str
    report_dir: str


def discover_series(manual_dir: str) -> list[tuple[str, str]]:
    """(series folder relative to manual_dir, patient id) of every folder holding DICOM files."""
    found = []
    for root, dirs, files in os.walk(manual_dir):
        dirs.sort()
        if any(f.lower().endswith('.dcm') for f in files):
            rel = os.path.relpath(root, manual_dir)
            match = _PATIENT_RE.search(rel)
            found.append((rel, match.group(0) if match else rel.split(os.sep)[0]))
    return found


def label_of(mean_rating: float) -> int:
    """Index into LABEL_NAMES of a mean malignancy rating: < 2.5 benign, > 3.5 malignant, else unsure."""
    return 0 if mean_rating < 2.5 else (2 if mean_rating > 3.5 else 1)


def _xml_paths(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.lower().endswith('.xml'))


def _reader_xml(directory: str, series_uid: str) -> xml_reader.ReaderXml:
    """The folder's first reader XML for `series_uid` (or naming no series); raises `XmlError` when there is none
    or when any of the folder's XML files does not parse."""
    paths = _xml_paths(directory)
    if not paths:
        raise xml_reader.XmlError('no reader XML in the series folder')
    parsed = [xml_reader.parse_reader_xml(p) for p in paths]
    matching = [x for x in parsed if x.series_uid in (None, series_uid)]
    if not matching:
        raise xml_reader.XmlError('reader XML is for another series')
    return matching[0]


def lists_nodules(directory: str) -> bool:
    """Whether a reader XML of the folder parses and lists a nodule with characteristics (cheap check)."""
    for path in _xml_paths(directory):
        try:
            if any(n.characteristics for n in xml_reader.parse_reader_xml(path).nodules):
                return True
        except xml_reader.XmlError:
            pass
    return False


def series_examples(task: SeriesTask) -> list[tuple[str, dict]]:
    """Examples of all nodules of one series; writes the series' report entry. Never raises for bad data."""
    entry = {'key': hashlib.sha1(task.series_dir.encode()).hexdigest(), 'series_dir': task.series_dir,
             'patient_id': task.patient_id, 'split': task.split, 'status': 'read', 'reason': '',
             'nodules_written': [], 'nodules_skipped': [], 'issues': []}
    examples = []
    try:
        directory = os.path.join(task.manual_dir, task.series_dir)
        series = ct_series.load_ct_series(directory)
        entry['series_uid'] = series.series_uid
        reader_xml = _reader_xml(directory, series.series_uid)
        spacing_z = series.image.GetSpacing()[2]
        annotations, issues = nodules_lib.place_annotations(reader_xml, series.sop_uids, series.z_positions, spacing_z)
        entry['issues'].extend(issues)
        clusters = nodules_lib.cluster_annotations(annotations, tol=series.slice_thickness)
        if not clusters:
            entry['issues'].append('series has no nodule with characteristics (>= 3 mm)')
        for index, cluster in enumerate(clusters):
            try:
                examples.append(_example(task, series, cluster, index, entry))
                entry['nodules_written'].append(examples[-1][0])
            except ValueError as e:
                entry['nodules_skipped'].append({'nodule_index': index, 'reason': str(e)})
    except (ct_series.SeriesError, xml_reader.XmlError) as e:
        entry.update(status='skipped', reason=str(e))
        examples = []
    except Exception as e:  # an unforeseen failure of one series must not stop the others
        entry.update(status='skipped', reason=f'unexpected error: {type(e).__name__}: {e}')
        examples = []
    report.write_part(task.report_dir, entry)
    return examples


def _example(task: SeriesTask, series: ct_series.CtSeries, cluster: list[nodules_lib.Annotation], index: int,
             entry: dict) -> tuple[str, dict]:
    """(key, features) of one nodule; adds its issues to `entry`; raises ValueError when it is skipped."""
    if len(cluster) > 4:
        entry['issues'].append(f'nodule {index}: {len(cluster)} annotations could not be split; first 4 readers kept')
    mask = nodules_lib.consensus_mask_image(cluster, series.image, task.consensus_level)
    if mask is None:
        raise ValueError(f'no voxel reaches {task.consensus_level:.0%} reader agreement')
    sample = nodule_sample.nodule_example(series.image, mask, crop_size=task.crop_size, spacing_mm=task.spacing_mm,
                                          radiomics_params=task.radiomics_params)
    if sample.padded:
        entry['issues'].append(f'nodule {index}: crop reaches outside the scan, padded with air (-1000 HU)')
    attributes = nodules_lib.reader_ratings(cluster)
    ratings = attributes[:, -1]
    mean = float(ratings[ratings > 0].mean())
    key = f'{series.series_uid}_{index}'
    return key, {
        'ct': sample.ct, 'mask': sample.mask, 'radiomics': sample.radiomics,
        'ratings': ratings, 'attributes': attributes,
        'malignancy_mean': np.float32(mean), 'label': label_of(mean),
        'patient_id': task.patient_id, 'series_uid': series.series_uid, 'nodule_index': np.int32(index),
        'centroid_mm': sample.centroid_mm, 'diameter_mm': np.float32(sample.diameter_mm),
        'fold': np.int32(task.fold),
    }
