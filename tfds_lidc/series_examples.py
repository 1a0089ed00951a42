"""From one series folder to its nodule features and its build report entry (cached per series)."""
from __future__ import annotations

import dataclasses
import filecmp
import os
import traceback

import numpy as np

from tfds_lidc import ct_series
from tfds_lidc import nodule_sample
from tfds_lidc import nodules as nodules_lib
from tfds_lidc import report
from tfds_lidc import series_cache
from tfds_lidc import xml_reader

LABEL_NAMES = ('benign', 'unsure', 'malignant')


@dataclasses.dataclass(frozen=True)
class SeriesTask:
    """One series to convert; plain data so that it pickles for process pools."""
    manual_dir: str
    series_dir: str          # relative to manual_dir
    patient_id: str
    crop_size: int
    spacing_mm: float
    consensus_level: float
    radiomics_params: str
    cache_dir: str
    code_version: str
    keep_incomplete: bool = False  # write nodules with marks on slices the series lacks (flagged complete=False)

    def cache_config(self) -> dict:
        """What, besides the series' files, decides its result (the cache key's config part)."""
        with open(self.radiomics_params) as f:
            params = f.read()
        return {'crop_size': self.crop_size, 'spacing_mm': self.spacing_mm, 'consensus_level': self.consensus_level,
                'radiomics_params': params, 'code_version': self.code_version, 'keep_incomplete': self.keep_incomplete}


def label_of(mean_rating: float) -> int:
    """Index into LABEL_NAMES of a mean malignancy rating: < 2.5 benign, > 3.5 malignant, else unsure."""
    return 0 if mean_rating < 2.5 else (2 if mean_rating > 3.5 else 1)


def _xml_paths(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.lower().endswith('.xml'))


def _parse_reader_xmls(directory: str) -> list[tuple[str, xml_reader.ReaderXml]]:
    """(path, parsed) of the folder's reader XML files; raises `XmlError` when there is none or when any of them does
    not parse."""
    paths = _xml_paths(directory)
    if not paths:
        raise xml_reader.XmlError('no reader XML in the series folder')
    parsed = []
    for path in paths:
        try:
            parsed.append((path, xml_reader.parse_reader_xml(path)))
        except xml_reader.XmlError as e:
            raise xml_reader.XmlError(f'{os.path.basename(path)}: {e}') from e
    return parsed


def _reader_xml(parsed: list[tuple[str, xml_reader.ReaderXml]], series_uid: str
                ) -> tuple[xml_reader.ReaderXml, list[str]]:
    """The first reader XML for `series_uid` (or naming no series), and a report note naming the others for it,
    which are not read; raises `XmlError` when there is none."""
    matching = [(path, x) for path, x in parsed if x.series_uid in (None, series_uid)]
    if not matching:
        raise xml_reader.XmlError('reader XML is for another series')
    (used, reader_xml), others = matching[0], [path for path, _ in matching[1:]]
    notes = []
    if others:
        same = all(filecmp.cmp(path, used, shallow=False) for path in others)
        notes.append(f'{len(matching)} reader XML files for this series: {os.path.basename(used)} read, '
                     f'{", ".join(os.path.basename(p) for p in others)} not read '
                     f'({"the same file content" if same else "other content"})')
    return reader_xml, notes


def process_series(task: SeriesTask) -> dict:
    """The report entry of one series, its nodule features stored in the cache (or found there).

    Every lesion of its reader XML is listed in the entry, written or skipped with the reason. Known data faults
    (unreadable DICOM, bad XML, ...) give status 'skipped' with the reason and are cached; a missing pixel-data decoder
    gives status 'skipped' and is not cached; an unexpected exception gives status 'error' with its traceback and is
    not cached, so a rerun tries again.
    """
    directory = os.path.join(task.manual_dir, task.series_dir)
    series_key = series_cache.key(directory, task.cache_config())
    cache_key = series_cache.cache_key(directory, series_key)
    entry, cache_notes = series_cache.load_entry(task.cache_dir, cache_key)
    if entry is not None:
        return dict(entry, series_dir=task.series_dir, patient_id=task.patient_id, cached=True)
    entry = {'series_key': series_key, 'cache_key': cache_key, 'series_dir': task.series_dir,
             'patient_id': task.patient_id, 'series_uid': '', 'status': 'read', 'reason': '', 'nodules_written': [],
             'lesions': [], 'issues': [], 'files_ignored': []}
    examples = []
    try:
        examples = _series_examples(task, directory, entry)
    except ct_series.DecoderMissingError as e:  # the environment's fault: neither cached nor in the fingerprint, so
        # that a run with the decoder installed reads the series
        entry.update(status='skipped', reason=str(e), lesions=unread_lesions(directory, str(e)))
        del entry['series_key']
        return dict(entry, cached=False)
    except (ct_series.SeriesError, xml_reader.XmlError) as e:
        entry.update(status='skipped', reason=str(e), nodules_written=[],
                     lesions=[] if isinstance(e, xml_reader.XmlError) else unread_lesions(directory, str(e)))
        examples = []
    except Exception as e:  # pylint: disable=broad-except  # recorded, the build goes on and fails at its end
        entry.update(status='error', reason=f'{type(e).__name__}: {e}', traceback=traceback.format_exc())
        return dict(entry, cached=False, issues=cache_notes + entry['issues'])
    series_cache.save(task.cache_dir, cache_key, entry, examples)
    return dict(entry, cached=False, issues=cache_notes + entry['issues'])  # the notes of this run only


def _series_examples(task: SeriesTask, directory: str, entry: dict) -> list[dict]:
    """Features of every nodule of the series that can be written; fills `entry` with every lesion."""
    reader_xmls = _parse_reader_xmls(directory)
    series = ct_series.load_ct_series(directory, [x.series_uid for _, x in reader_xmls if x.series_uid])
    entry['series_uid'] = series.series_uid
    entry['issues'].extend(series.notes)
    entry['files_ignored'] = series.files_ignored
    reader_xml, notes = _reader_xml(reader_xmls, series.series_uid)
    entry['issues'].extend(notes)
    lesions, issues = nodules_lib.find_lesions(reader_xml, series.sop_uids, series.z_positions,
                                               float(np.median(np.diff(series.positions))), tol=series.slice_thickness)
    entry['issues'].extend(issues)
    if not any(lesion.annotations for lesion in lesions):
        entry['issues'].append('series has no nodule with characteristics (>= 3 mm)')
    examples = []
    for index, lesion in enumerate(lesions):
        lesion_notes = lesion.issues
        skip = lesion.skip_reason(series.z_positions, task.keep_incomplete)
        if skip is None:
            try:
                examples.append(_example(task, series, lesion, index, lesion_notes))
            except nodule_sample.NoduleError as e:
                skip = report.reason_kind(str(e)), str(e)
        if skip is None:
            key = f'{series.series_uid}_{index}'
            entry['nodules_written'].append(key)
            entry['lesions'].append(lesion_entry(index, lesion, lesion_notes, key=key))
        else:
            entry['lesions'].append(lesion_entry(index, lesion, lesion_notes, skip=skip))
    return examples


def lesion_entry(index: int, lesion: nodules_lib.Lesion, issues: list[str], *, key: str = '',
                 skip: tuple[str, str] | None = None) -> dict:
    """The build report entry of the lesion `index` of a series: written as the example `key`, or skipped with
    (kind, reason) `skip`."""
    kind, reason = skip or ('', '')
    z = lesion.marked_z()
    return report.lesion(f'lesion {index}', 'skipped' if skip else 'written', key=key, kind=kind, reason=reason,
                         issues=issues, nodule_index=index, complete=lesion.complete,
                         readers=[a.describe() for a in lesion.annotations],
                         small_marks=[a.describe() for a in lesion.small_marks],
                         z_mm=[float(z.min()), float(z.max())] if len(z) else [])


def unread_lesions(directory: str, reason: str) -> list[dict]:
    """The report entries of the lesions of a folder's first reader XML, whose series is not read (for `reason`), each
    skipped as 'series skipped'; their marks are clustered by their z alone. None when the folder holds no reader XML
    or it does not parse."""
    paths = _xml_paths(directory)
    if not paths:
        return []
    try:
        reader_xml = xml_reader.parse_reader_xml(paths[0])
    except xml_reader.XmlError:
        return []
    spacing = nodules_lib.xml_slice_spacing(reader_xml)
    lesions, _ = nodules_lib.find_lesions(reader_xml, [], np.zeros(0), spacing, tol=spacing)
    skip = ('series skipped', f'series skipped: {reason}')
    return [lesion_entry(index, lesion, lesion.issues, skip=skip) for index, lesion in enumerate(lesions)]


def _example(task: SeriesTask, series: ct_series.CtSeries, lesion: nodules_lib.Lesion, index: int,
             notes: list[str]) -> dict:
    """Features of one nodule; adds its notes to `notes`; raises NoduleError when it is skipped."""
    kept, left_out = nodules_lib.select_readers(list(lesion.annotations))
    if left_out:
        notes.append(f'{len(lesion.annotations)} annotations clustered; mask and ratings from one annotation per '
                     f'reader ({len(kept)}), left out: ' + ', '.join(a.describe() for a in left_out))
    attributes = nodules_lib.reader_ratings(kept)
    ratings = attributes[:, -1]
    if not np.any(ratings > 0):
        raise nodule_sample.NoduleError('no reader gave a valid malignancy rating (1-5)')
    mask = nodules_lib.consensus_mask_image(kept, series.image, task.consensus_level)
    if mask is None:
        raise nodule_sample.NoduleError(f'no voxel reaches the consensus level ({task.consensus_level:.0%} of '
                                        f'readers)')
    sample = nodule_sample.nodule_example(series.image, mask, crop_size=task.crop_size, spacing_mm=task.spacing_mm,
                                          radiomics_params=task.radiomics_params)
    if sample.padded:
        notes.append('crop reaches outside the scan, padded with air (-1000 HU)')
    mean = float(ratings[ratings > 0].mean())
    return {
        'ct': sample.ct, 'mask': sample.mask, 'radiomics': sample.radiomics,
        'ratings': ratings, 'attributes': attributes,
        'malignancy_mean': np.float32(mean), 'label': np.int64(label_of(mean)), 'nodule_index': np.int32(index),
        'centroid_mm': sample.centroid_mm, 'diameter_mm': np.float32(sample.diameter_mm),
        'complete': np.bool_(lesion.complete),
    }


def tfds_examples(cache_dir: str, entry: dict, fold: int) -> list[tuple[str, dict]]:
    """(key, TFDS features) of a processed series' nodules, read back from the cache."""
    out = []
    for key, features in zip(entry['nodules_written'], series_cache.load_examples(cache_dir, entry)):
        out.append((key, dict(features, patient_id=entry['patient_id'], series_uid=entry['series_uid'],
                              fold=np.int32(fold))))
    return out
