"""nodule_table: any labelled collection of lung nodules, a CSV row per nodule, with lidc_idri's example features."""
from __future__ import annotations

import collections
import functools
import os

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils.lazy_imports_utils import apache_beam as beam

from tfds_lidc import lidc_idri
from tfds_lidc import nodule_rows
from tfds_lidc import report
from tfds_lidc import series_cache
from tfds_lidc import splits as splits_lib
from tfds_lidc.errors import LidcDataError
from tfds_lidc.nodule_table import row_examples
from tfds_lidc.nodule_table import table_report

CSV_NAME = 'nodules.csv'

_MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put a CSV named {CSV_NAME} in `manual_dir`, one row per nodule, with the columns `predict --nodules` reads plus
`patient_id` and `label`:
  the CT:      `ct` (a DICOM series folder or a .mhd / .nii.gz / .nrrd file, relative to manual_dir), or `seriesuid`
               (a <seriesuid>.mhd / .nii.gz / .nrrd file or a DICOM series folder named by it, anywhere under
               manual_dir);
  the nodule:  `mask` (a mask file on the CT's grid), `xml` (a LIDC reader XML: each of its nodules, or the one
               `nodule_index` names), or `coordX`, `coordY`, `coordZ` (centre in mm, LPS) with `diameter_mm` (a
               sphere mask);
  patient_id:  patients are split and folded as LIDC-IDRI's, or by a `split` column (train / validation / test; an
               external test set is all test);
  label:       {row_examples.LABEL_HELP}; a reader XML row may leave it empty (its readers' ratings).
Other columns are kept in each example's `metadata` (JSON). For a demo cohort: `python run.py synth --layout table
--out DIR`.
"""


class TableError(LidcDataError, ValueError):
    """The table gives no usable nodule, or the build failed; the message names the CSV and the report."""


class Builder(lidc_idri.Builder):
    """DatasetBuilder for a table of labelled nodules: lidc_idri's configs, features (and more), worker pool and
    Beam support; its own rows instead of series."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release: the lidc_idri features of nodules listed in a CSV.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        lidc = super()._info()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                **lidc.features,
                # Beyond lidc_idri's: where the label and the mask come from, the CSV row and its other columns.
                'label_source': tfds.features.Text(),  # 'given' (a class or pathology) | 'ratings' (readers')
                'mask_source': tfds.features.Text(),   # 'mask file ...' | 'sphere of diameter ...' | 'consensus ...'
                'row': tfds.features.Scalar(dtype=np.int32),
                'metadata': tfds.features.Text(),      # JSON {column: value} of the row's other columns
            }),
            supervised_keys=None,
            metadata=lidc.metadata,
        )

    def cache_dir(self, download_dir: str) -> str:
        """Where the per-row results of this builder config are kept between runs."""
        return os.path.join(download_dir, self.name, self.builder_config.name)

    def row_tasks(self, manual_dir: str, cache_dir: str) -> tuple[list[row_examples.RowTask], list[dict]]:
        """(a task per row of manual_dir/nodules.csv, the report entries of rows refused before reading: an unknown
        split, a patient in two splits, the same nodule twice). TableError when the CSV cannot be used at all."""
        csv_path = os.path.join(manual_dir, CSV_NAME)
        try:
            rows = nodule_rows.read_rows(csv_path, required=('patient_id', 'label'))
        except nodule_rows.NoduleTableError as e:
            raise TableError(str(e)) from e
        index = nodule_rows.index_ct_root(manual_dir) if any(r.get('seriesuid') for r in rows) else {}
        cfg = self.builder_config
        tasks, refused, seen, patient_split = [], [], {}, {}
        for number, row in enumerate(rows, start=1):
            reason = ''
            identity = tuple(row.get(c, '') for c in ('ct', 'seriesuid', 'mask', 'xml', *nodule_rows.CENTER_COLUMNS,
                                                      'diameter_mm', 'nodule_index'))
            split = row.get('split', '')
            if 'split' in row and split not in splits_lib.SPLITS:
                reason = f'unknown split {split!r}: use one of {", ".join(splits_lib.SPLITS)}'
            elif identity in seen:
                reason = f'duplicate nodule: the same CT and nodule as row {seen[identity]}'
            elif split and patient_split.setdefault(row.get('patient_id'), (split, number))[0] != split:
                first_split, first = patient_split[row.get('patient_id')]
                reason = f'patient {row.get("patient_id")} is in split {first_split} (row {first}): a patient is in one'
            if reason:
                refused.append({'row': number, 'patient_id': row.get('patient_id', ''), 'status': 'skipped',
                                'reason': reason, 'nodules_written': [], 'nodules_skipped': [], 'issues': []})
                continue
            seen[identity] = number
            try:
                ct_path, ct_error = nodule_rows.row_ct(row, manual_dir, f'the manual_dir {manual_dir}', index), ''
            except nodule_rows.NoduleInputError as e:
                ct_path, ct_error = '', f'missing CT: {e}'
            tasks.append(row_examples.RowTask(
                row_number=number, row=row, ct_path=ct_path, ct_error=ct_error, base_dir=manual_dir,
                crop_size=cfg.crop_size, spacing_mm=cfg.spacing_mm, consensus_level=cfg.consensus_level,
                radiomics_params=cfg.radiomics_params, cache_dir=cache_dir, code_version=str(self.VERSION)))
        return tasks, refused

    def input_fingerprint(self, manual_dir: str, download_dir: str) -> str:
        """One hash of the table and the files its rows read, under this config and version."""
        tasks, refused = self.row_tasks(manual_dir, self.cache_dir(download_dir))
        return series_cache.fingerprint([t.cache_key() for t in tasks if not t.ct_error]
                                        + [f"{e['row']}:{e['reason']}" for e in refused])

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        cache_dir = self.cache_dir(os.fspath(dl_manager.download_dir))
        tasks, refused = self.row_tasks(manual_dir, cache_dir)
        entries = refused + list(tfds.core.utils.tqdm(self._map(row_examples.process_row, tasks), total=len(tasks),
                                                      desc='nodule_table rows', unit=' rows'))
        written = [e for e in entries if e['nodules_written']]
        patients = sorted({e['patient_id'] for e in written})
        if any('split' in t.row for t in tasks):
            folds, split_of = splits_lib.assign(patients), {t.row_number: t.row['split'] for t in tasks}
            assignment = {e['patient_id']: (split_of[e['row']], folds[e['patient_id']][1]) for e in written}
            used = {s for s, _ in assignment.values()}
            empty = {s: 'no row of the table is in this split' for s in splits_lib.SPLITS if s not in used}
        else:
            assignment, empty = splits_lib.plan(patients, [])
        fingerprint = series_cache.fingerprint([e['cache_key'] for e in entries if 'cache_key' in e]
                                               + [f"{e['row']}:{e['reason']}" for e in refused])
        csv_path = os.path.join(manual_dir, CSV_NAME)
        self.report = table_report.build(entries, assignment, empty, fingerprint, csv_path)
        self.report_paths = report.write(self.report, cache_dir)
        if self.report['errors']:
            failed = '; '.join(f"row {e['row']}: {e['reason']}" for e in self.report['errors'])
            raise TableError(f"{len(self.report['errors'])} rows failed with an unexpected error (traceback in "
                             f'{self.report_paths[0]}): {failed}')
        if not written:
            reasons = collections.Counter(table_report.kind(n['reason']) for n in self.report['nodules']
                                          if n['status'] == 'skipped')
            raise TableError(f'{csv_path}: no usable row among {len(entries)} ('
                             + '; '.join(f'{n} x {k}' for k, n in reasons.most_common()) + f'); the rows and their '
                             f'reasons are in {self.report_paths[0]}.')
        self.report_paths += report.write(self.report, os.fspath(self.data_path))
        self.info.metadata.update(series_fingerprint=fingerprint, manual_dir=manual_dir, empty_splits=empty,
                                  nodules_per_split=self.report['nodules_per_split'])
        by_split = {}
        for e in written:
            split, fold = assignment[e['patient_id']]
            by_split.setdefault(split, []).append((e, fold))
        return {split: self._generate_examples(split, cache_dir, by_split[split]) for split in splits_lib.SPLITS
                if split in by_split}

    def _generate_examples(self, split: str, cache_dir: str, rows: list[tuple[dict, int]]):
        load = functools.partial(_row_examples, cache_dir)
        if self._use_beam:
            return beam.Create(rows) | f'{split}_rows' >> beam.FlatMap(load)
        return (example for item in rows for example in load(item))


def _row_examples(cache_dir: str, item: tuple[dict, int]) -> list[tuple[str, dict]]:
    entry, fold = item
    return row_examples.tfds_examples(cache_dir, entry, fold)
