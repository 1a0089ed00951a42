"""From one row of a nodule table to its nodules' features and its build report entry (cached per row).

A row's CT and nodule are read as `predict --nodules` reads them (tfds_lidc.nodule_rows, tfds_lidc.nodule_masks); the
crop, mask and radiomics come from `nodule_sample.nodule_example`, and a reader XML's nodules from the lidc_idri
builder's own code (series_examples), so that a nodule has the same example in both datasets.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import traceback

import numpy as np

from tfds_lidc import ct_series
from tfds_lidc import nodule_masks
from tfds_lidc import nodule_rows
from tfds_lidc import nodule_sample
from tfds_lidc import nodules as nodules_lib
from tfds_lidc import series_cache
from tfds_lidc import series_examples
from tfds_lidc import xml_reader

NUM_READERS = 4
NUM_ATTRIBUTES = len(xml_reader.ATTRIBUTE_NAMES)
LABEL_WORDS = {'benign': 0, '0': 0, 'unsure': 1, 'indeterminate': 1, 'malignant': 2, '1': 2}
LABEL_HELP = "benign / malignant (0 / 1, or unsure), or 1-5 ratings per reader separated by ';' ('4;5;3', '4;')"
# Columns the builder reads; any other column is kept, as text, in the example's `metadata`.
READ_COLUMNS = ('ct', 'seriesuid', 'mask', 'xml', *nodule_rows.CENTER_COLUMNS, 'diameter_mm', 'nodule_index',
                'patient_id', 'label', 'split')


@dataclasses.dataclass(frozen=True)
class RowTask:
    """One row to convert; plain data so that it pickles for process pools. Its crop settings are named as
    series_examples.SeriesTask's, whose nodule code reads them."""
    row_number: int         # 1-based, as a spreadsheet shows the rows after the header
    row: dict
    ct_path: str            # resolved from `ct` or `seriesuid`; '' when it could not be (reason in ct_error)
    ct_error: str
    base_dir: str           # the CSV's folder: relative paths start there
    crop_size: int
    spacing_mm: float
    consensus_level: float
    radiomics_params: str
    cache_dir: str
    code_version: str

    def cache_key(self) -> str:
        """The identity of the row's result: the row, the builder config and code, and the sizes and modification
        times of the files it reads (so a changed CT, mask or XML misses the cache)."""
        with open(self.radiomics_params) as f:
            params = f.read()
        h = hashlib.sha256(json.dumps([self.row_number, self.row, self.ct_path, self.crop_size, self.spacing_mm,
                                       self.consensus_level, params, self.code_version], sort_keys=True).encode())
        nodule = nodule_rows.row_nodule(self.row, self.base_dir) if not self.ct_error else {}
        for path in (self.ct_path, nodule.get('mask'), nodule.get('xml')):
            for file in _files(path):
                stat = os.stat(file)
                h.update(f'{file}:{stat.st_size}:{stat.st_mtime_ns}'.encode())
        return h.hexdigest()[:32]


def _files(path: str | None) -> list[str]:
    """The files a CT, mask or XML path reads: a DICOM folder's slices, a MetaImage header's data file too."""
    if not path or not os.path.exists(path):
        return []
    if os.path.isdir(path):
        return ct_series.dicom_files(path)
    files = [path]
    if path.endswith('.mhd'):
        with open(path, errors='replace') as f:
            data = [line.split('=', 1)[1].strip() for line in f if line.split('=')[0].strip() == 'ElementDataFile']
        files += [p for p in (os.path.join(os.path.dirname(path), d) for d in data) if os.path.isfile(p)]
    return files


class RowError(nodule_masks.NoduleInputError):
    """The row cannot be used (missing CT, unknown label, ...); the message is the reason reported."""


def parse_label(text: str) -> tuple[int, np.ndarray, str]:
    """(stored class id, ratings [4] (0: none), label source 'given' | 'ratings') of a `label` cell."""
    value = text.strip().lower()
    if value in LABEL_WORDS:
        return LABEL_WORDS[value], np.zeros(NUM_READERS, np.int32), 'given'
    if ';' in value:
        parts = [p.strip() for p in value.split(';') if p.strip()]
        if parts and len(parts) <= NUM_READERS and all(p in ('1', '2', '3', '4', '5') for p in parts):
            ratings = np.zeros(NUM_READERS, np.int32)
            ratings[:len(parts)] = [int(p) for p in parts]
            return series_examples.label_of(float(np.mean(ratings[:len(parts)]))), ratings, 'ratings'
    raise RowError(f'unknown label {text!r}: use {LABEL_HELP}')


def metadata(row: dict) -> str:
    """The row's other columns as JSON text (kept in the example)."""
    return json.dumps({k: v for k, v in row.items() if k not in READ_COLUMNS}, sort_keys=True)


def process_row(task: RowTask) -> dict:
    """The report entry of one row, its nodules' features stored in the cache (or found there).

    A row that cannot be used gives status 'skipped' with the reason; an unexpected exception gives status 'error'
    with its traceback and is not cached, so a rerun tries again.
    """
    entry = {'row': task.row_number, 'patient_id': task.row.get('patient_id', ''), 'ct': task.ct_path,
             'series_uid': '', 'status': 'read', 'reason': task.ct_error, 'label_source': '', 'nodules_written': [],
             'nodules_skipped': [], 'masks': [], 'issues': [], 'metadata': metadata(task.row)}
    if task.ct_error:
        return dict(entry, status='skipped', cached=False)
    cache_key = task.cache_key()
    cached, cache_notes = series_cache.load_entry(task.cache_dir, cache_key)
    if cached is not None:
        return dict(cached, cached=True)
    entry['cache_key'] = cache_key
    entry['issues'].extend(cache_notes)  # a damaged cache entry, discarded
    try:
        examples = _row_examples(task, entry)
    except (nodule_masks.NoduleInputError, ct_series.SeriesError, xml_reader.XmlError) as e:
        entry.update(status='skipped', reason=str(e), nodules_written=[], nodules_skipped=[], masks=[])
        examples = []
    except Exception as e:  # pylint: disable=broad-except  # recorded, the build goes on and fails at its end
        entry.update(status='error', reason=f'{type(e).__name__}: {e}', traceback=traceback.format_exc())
        return dict(entry, cached=False)
    series_cache.save(task.cache_dir, cache_key, entry, examples)
    return dict(entry, cached=False)


def _row_examples(task: RowTask, entry: dict) -> list[dict]:
    """Features of the row's nodule(s) (a reader XML may give several); fills `entry`."""
    if not entry['patient_id']:
        raise RowError('no patient_id')
    given = parse_label(task.row['label']) if task.row.get('label') else None
    nodule = nodule_rows.row_nodule(task.row, task.base_dir)
    image, series = nodule_masks.read_ct(task.ct_path)
    entry['series_uid'] = series.series_uid if series is not None else os.path.basename(task.ct_path)
    if nodule['xml']:
        return _xml_examples(task, series, nodule['xml'], given, entry)
    if given is None:
        raise RowError(f'no label: give {LABEL_HELP} (only a reader XML row may leave it empty: its readers\' '
                       f'ratings are the label)')
    if nodule['mask']:
        mask, source = nodule_masks.read_mask(nodule['mask'], image), f'mask file {nodule["mask"]}'
    elif nodule['center'] is not None:
        lo, hi = nodule_masks.DIAMETER_RANGE_MM
        if nodule['diameter'] is None or not lo <= nodule['diameter'] <= hi:
            raise RowError(f'a centre needs a diameter_mm from {lo:g} to {hi:g} mm, a lung nodule\'s or mass\'s '
                           f'(got {nodule["diameter"]})')
        centre = nodule_masks.parse_center(nodule['center'], nodule['coordinates'])
        mask = nodule_masks.sphere_mask(image, centre, nodule['diameter'])
        source = f'sphere of diameter {nodule["diameter"]:g} mm at LPS {nodule_masks.plain(centre)} mm'
    else:
        raise RowError("the row gives no nodule ('mask', 'xml', or 'coordX', 'coordY', 'coordZ' with 'diameter_mm')")
    label, ratings, label_source = given
    entry['label_source'] = label_source
    try:
        sample = nodule_sample.nodule_example(image, mask, crop_size=task.crop_size, spacing_mm=task.spacing_mm,
                                              radiomics_params=task.radiomics_params)
    except nodule_sample.NoduleError as e:
        raise RowError(str(e)) from e
    if sample.padded:
        entry['issues'].append('crop reaches outside the scan, padded with air (-1000 HU)')
    rated = ratings[ratings > 0]
    entry['nodules_written'].append(f'row{task.row_number}')
    entry['masks'].append(source)
    return [{'ct': sample.ct, 'mask': sample.mask, 'radiomics': sample.radiomics, 'ratings': ratings,
             'attributes': np.zeros((NUM_READERS, NUM_ATTRIBUTES), np.int32),
             'malignancy_mean': np.float32(rated.mean() if len(rated) else np.nan), 'label': np.int64(label),
             'nodule_index': np.int32(0), 'centroid_mm': sample.centroid_mm,
             'diameter_mm': np.float32(sample.diameter_mm), 'complete': np.bool_(True)}]


def _xml_examples(task: RowTask, series: ct_series.CtSeries | None, xml: str,
                  given: tuple[int, np.ndarray, str] | None, entry: dict) -> list[dict]:
    """The nodules of a reader XML, made as the lidc_idri builder makes them (consensus mask, readers' ratings and
    attributes); a given label replaces the ratings' label. `nodule_index` picks one of them."""
    if series is None:
        raise RowError('a reader XML needs the CT as a DICOM series folder (the XML names its slices)')
    reader_xml = xml_reader.parse_reader_xml(xml)
    if reader_xml.series_uid not in (None, series.series_uid):
        raise RowError(f'reader XML {xml} is for series {reader_xml.series_uid}, the CT is series '
                       f'{series.series_uid}')
    lesions, issues = nodules_lib.find_lesions(reader_xml, series.sop_uids, series.z_positions,
                                               float(np.median(np.diff(series.positions))), tol=series.slice_thickness)
    entry['issues'].extend(issues)
    wanted = range(len(lesions))
    if task.row.get('nodule_index'):
        if not task.row['nodule_index'].isdigit() or int(task.row['nodule_index']) >= len(lesions):
            raise RowError(f"nodule_index {task.row['nodule_index']!r}: the XML holds {len(lesions)} nodules "
                           f"(0..{len(lesions) - 1})")
        wanted = [int(task.row['nodule_index'])]
    elif given is not None and len(lesions) > 1:
        raise RowError(f'the XML holds {len(lesions)} nodules and the row one label: say which nodule it is for '
                       f'with a nodule_index column (0..{len(lesions) - 1})')
    entry['label_source'] = given[2] if given is not None else 'ratings'
    examples = []
    for index in wanted:
        skip = lesions[index].skip_reason(series.z_positions)  # as the lidc_idri builder: incomplete ones skipped
        if skip is not None:
            entry['nodules_skipped'].append({'nodule_index': index, 'reason': skip[1]})
            continue
        try:
            # The lidc_idri builder's own nodule code (task has its crop settings), so both datasets agree.
            example = series_examples._example(  # pylint: disable=protected-access
                task, series, lesions[index], index, entry['issues'])
        except nodule_sample.NoduleError as e:
            entry['nodules_skipped'].append({'nodule_index': index, 'reason': str(e)})
            continue
        if given is not None:
            example['label'] = np.int64(given[0])
        examples.append(example)
        entry['nodules_written'].append(f'row{task.row_number}_nodule{index}')
        entry['masks'].append(f'consensus (>= {task.consensus_level:.0%} of readers) of reader XML {xml}')
    if not examples and not entry['nodules_skipped']:
        raise RowError(f'reader XML {xml} marks no nodule >= 3 mm in this series')
    return examples


def tfds_examples(cache_dir: str, entry: dict, fold: int) -> list[tuple[str, dict]]:
    """(key, TFDS features) of a processed row's nodules, read back from the cache."""
    text = dict(patient_id=entry['patient_id'], series_uid=entry['series_uid'], fold=np.int32(fold),
                row=np.int32(entry['row']), label_source=entry['label_source'], metadata=entry['metadata'])
    return [(key, dict(features, **text, mask_source=source))
            for key, source, features in zip(entry['nodules_written'], entry['masks'],
                                              series_cache.load_examples(cache_dir, entry))]
