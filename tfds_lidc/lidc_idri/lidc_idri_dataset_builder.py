"""lidc_idri: LIDC-IDRI lung nodules (3D CT crop, consensus mask, radiomics, reader ratings)."""
from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import multiprocessing.pool
import os
from collections.abc import Iterable, Iterator

import numpy as np
import SimpleITK as sitk
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils.lazy_imports_utils import apache_beam as beam

from tfds_lidc import discover
from tfds_lidc import radiomics_features
from tfds_lidc import report
from tfds_lidc import series_cache
from tfds_lidc import series_examples
from tfds_lidc import splits as splits_lib
from tfds_lidc import xml_reader
from tfds_lidc.errors import LidcDataError

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download LIDC-IDRI from The Cancer Imaging Archive (https://www.cancerimagingarchive.net/collection/lidc-idri/)
with the NBIA Data Retriever: the CT images (DICOM, ~124 GB) and the radiologist annotations (XML).
Place them in `manual_dir` in the TCIA layout, one folder per patient and one folder per series:

  <manual_dir>/LIDC-IDRI-0001/<StudyInstanceUID or study folder>/<SeriesInstanceUID or series folder>/*.dcm
  <manual_dir>/LIDC-IDRI-0001/<study>/<series>/<reader XML>.xml     (LidcReadMessage, http://www.nih.gov)
  ...
  <manual_dir>/LIDC-IDRI-1012/...

Every folder that holds DICOM slices (.dcm files, or files without an extension that begin as DICOM files do) is
read as one series: the one its reader XML names (else its largest axial CT stack); other files in it (localizers,
other series, dose reports) are left out and listed in build_report.json. The reader XML must sit next to its slices
(as in the TCIA download; the XML archive "LIDC-XML-only" can be unpacked into the matching series folders).
Compressed DICOM (JPEG, JPEG lossless, JPEG-LS, JPEG 2000, RLE) is read as it is.
Patient, study and series folders may be symlinks (e.g. into a shared store). Any subset of patients builds;
a series met twice (linked or copied twice) is read once.
Non-CT series (CR/DX radiographs) and folders with XML only are skipped and listed in build_report.json.
For a small local demo in the same layout: `autorad synth --out DIR --num_scans N`.
"""


@dataclasses.dataclass(eq=False)
class LidcIdriConfig(tfds.core.BuilderConfig):
    """Crop geometry and consensus of one dataset variant."""
    crop_size: int = 64
    spacing_mm: float = 1.0
    consensus_level: float = 0.5
    radiomics_params: str = radiomics_features.DEFAULT_PARAMS


class BuildError(LidcDataError, RuntimeError):
    """The build did not finish; the message names the series and the report."""


def _with_progress(results: Iterable[dict], total: int) -> Iterator[dict]:
    """Passes through the series results, with a progress bar over series."""
    with tfds.core.utils.tqdm(total=total, desc='lidc_idri series', unit=' series') as bar:
        for entry in results:
            bar.update(1)
            yield entry


def _unread_entry(manual_dir: str, folder: discover.Folder) -> dict:
    """The report entry of a folder holding reader XML only (its lesions listed as skipped), or reached again through
    a symlink (listed where it was read)."""
    first = 'the manual_dir itself' if folder.same_as == '.' else folder.same_as
    reason = (f'a folder already read, reached again through a symlink: {first}' if folder.same_as
              else 'reader XML without DICOM slices (its series folder holds no DICOM files)')
    lesions = [] if folder.same_as else series_examples.unread_lesions(os.path.join(manual_dir, folder.rel), reason)
    return {'series_dir': folder.rel, 'patient_id': folder.patient_id, 'series_uid': '', 'status': 'skipped',
            'reason': reason, 'nodules_written': [], 'lesions': lesions, 'issues': []}


def _skip_repeated_series(entries: list[dict]) -> list[dict]:
    """The entries in path order (by folder names, as the walk met them), a series read from two folders (a patient
    folder copied twice, say) kept at its first path and skipped at the others (its lesions listed at the first): its
    nodules would otherwise be written twice under the same keys."""
    first, out = {}, []
    for entry in sorted(entries, key=lambda e: e['series_dir'].split(os.sep)):
        uid = entry['series_uid']
        if entry['status'] == 'read' and uid in first:
            entry = dict(entry, status='skipped', nodules_written=[], lesions=[], issues=[],
                         reason=f'a copy of a series already read (SeriesInstanceUID {uid}): {first[uid]}')
        elif entry['status'] == 'read':
            first[uid] = entry['series_dir']
        out.append(entry)
    return out


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for LIDC-IDRI nodules."""

    VERSION = tfds.core.Version('1.2.0')
    RELEASE_NOTES = {
        '1.0.0': 'Initial release.',
        '1.1.0': 'Any cohort builds (empty splits left out and named in the metadata); series with uneven slice '
                 'positions or one missing slice are interpolated instead of skipped; duplicate slices dropped; '
                 'as pylidc: single-point rois dropped, invalid malignancy ratings left out, nodules with no valid '
                 'rating skipped; clusters of more than 4 annotations keep one annotation per reader for both mask '
                 'and ratings; symlinked folders followed; per-series cache; series fingerprint in the metadata; '
                 'radiomics with pyradiomics\' CT settings (voxelArrayShift 1000, minimumROIDimensions 2).',
        '1.2.0': 'Crops along the patient LPS axes whatever the scan\'s stored orientation; a series folder\'s series '
                 'is the one its reader XML names (else the largest axial CT stack), its other files listed in the '
                 'report; compressed transfer syntaxes read. Readers\' marks on slices the series lacks are clustered '
                 'by their z as pylidc does, and every lesion is listed in the build report, written or skipped with '
                 'its reason; a nodule with marks outside its series is skipped unless the build keeps it (feature '
                 '`complete` False); nodule_index is the lesion\'s index among all the XML\'s lesions.',
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        LidcIdriConfig(name='crop64_1mm', description='64^3 crop at 1 mm isotropic.', crop_size=64),
        LidcIdriConfig(name='crop32_1mm', description='32^3 crop at 1 mm isotropic.', crop_size=32),
    ]
    DEFAULT_CONFIG_NAME = 'crop64_1mm'

    def __init__(self, *, num_workers: int = 1, keep_incomplete: bool = False, **kwargs):
        """`keep_incomplete`: also write nodules with readers' marks on slices their series does not hold, from the
        slices it holds, flagged `complete` False (by default they are skipped and named in the report)."""
        self._num_workers = num_workers
        self._keep_incomplete = keep_incomplete
        self._use_beam = False
        self._map = map
        self.report: dict | None = None
        self.report_paths: list[str] = []
        kwargs.setdefault('file_format', tfds.core.FileFormat.ARRAY_RECORD)  # readable without TensorFlow
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.crop_size
        meta = radiomics_features.metadata(self.builder_config.radiomics_params)
        meta.update(attribute_names=list(xml_reader.ATTRIBUTE_NAMES), crop_size=s,
                    spacing_mm=self.builder_config.spacing_mm, consensus_level=self.builder_config.consensus_level)
        num_features = len(meta['radiomics_feature_names'])
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                'ct': tfds.features.Tensor(shape=(s, s, s), dtype=np.int16),
                'mask': tfds.features.Tensor(shape=(s, s, s), dtype=np.uint8),
                'radiomics': tfds.features.Tensor(shape=(num_features,), dtype=np.float32),
                'ratings': tfds.features.Tensor(shape=(4,), dtype=np.int32),
                'attributes': tfds.features.Tensor(shape=(4, len(xml_reader.ATTRIBUTE_NAMES)), dtype=np.int32),
                'malignancy_mean': tfds.features.Scalar(dtype=np.float32),
                'label': tfds.features.ClassLabel(names=list(series_examples.LABEL_NAMES)),
                'patient_id': tfds.features.Text(),
                'series_uid': tfds.features.Text(),
                'nodule_index': tfds.features.Scalar(dtype=np.int32),
                'centroid_mm': tfds.features.Tensor(shape=(3,), dtype=np.float32),
                'diameter_mm': tfds.features.Scalar(dtype=np.float32),
                'fold': tfds.features.Scalar(dtype=np.int32),
                'complete': tfds.features.Scalar(dtype=np.bool_),
            }),
            supervised_keys=None,
            homepage='https://www.cancerimagingarchive.net/collection/lidc-idri/',
            metadata=tfds.core.MetadataDict(meta),
        )

    def series_tasks(self, manual_dir: str, cache_dir: str) -> tuple[list[series_examples.SeriesTask],
                                                                      list[discover.Folder]]:
        """(a task per DICOM series folder of `manual_dir`, the folders not read: reader XML only, or reached again
        through a symlink)."""
        cfg = self.builder_config
        folders = discover.discover(manual_dir)
        tasks = [series_examples.SeriesTask(
            manual_dir=manual_dir, series_dir=f.rel, patient_id=f.patient_id, crop_size=cfg.crop_size,
            spacing_mm=cfg.spacing_mm, consensus_level=cfg.consensus_level, radiomics_params=cfg.radiomics_params,
            cache_dir=cache_dir, code_version=str(self.VERSION), keep_incomplete=self._keep_incomplete)
            for f in folders if f.has_dicom]
        return tasks, [f for f in folders if not f.has_dicom]

    def series_cache_dir(self, download_dir: str) -> str:
        """Where the per-series results of this builder config are kept between runs."""
        return os.path.join(download_dir, self.name, self.builder_config.name)

    def _download_and_prepare(self, dl_manager, download_config=None):
        self._use_beam = bool(download_config and (download_config.beam_runner or download_config.beam_options))
        pool = _series_pool(self._num_workers) if self._num_workers > 1 else None
        self._map = pool.imap_unordered if pool is not None else map
        try:
            super()._download_and_prepare(dl_manager, download_config)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)  # TFDS raises, with the instructions, if missing or empty
        cache_dir = self.series_cache_dir(os.fspath(dl_manager.download_dir))
        tasks, unread = self.series_tasks(manual_dir, cache_dir)
        if not tasks:
            raise BuildError(f'No DICOM series found under {manual_dir}: it should hold '
                             'LIDC-IDRI-NNNN/<study>/<series>/*.dcm with the reader XML (docs/data.md, '
                             '"Real LIDC-IDRI").')
        entries = [_unread_entry(manual_dir, f) for f in unread]
        try:
            entries.extend(_with_progress(self._map(series_examples.process_series, tasks), len(tasks)))
        finally:
            if len(entries) < len(tasks) + len(unread):  # interrupted: report the series done so far
                self.report = dict(report.build(entries, {}, {}, '', manual_dir), interrupted=True)
                self.report_paths = report.write(self.report, cache_dir)
        entries = _skip_repeated_series(entries)
        with_nodules = sorted({e['patient_id'] for e in entries if e['nodules_written']})
        assignment, empty = splits_lib.plan(with_nodules, [e['patient_id'] for e in entries])
        fingerprint = series_cache.fingerprint(e['series_key'] for e in entries if 'series_key' in e)
        self.report = report.build(entries, assignment, empty, fingerprint, manual_dir)
        self.report_paths = report.write(self.report, cache_dir)
        errors = self.report['errors']
        if errors:
            failed = '; '.join(f"{e['series_dir']}: {e['reason']}" for e in errors)
            raise BuildError(f'{len(errors)} series failed with an unexpected error (traceback in '
                             f'{self.report_paths[0]}): {failed}')
        if not with_nodules:
            raise BuildError(f'No nodule could be written from the {len(tasks)} series of {manual_dir}; the reasons '
                             f'are in {self.report_paths[0]}.')
        self.report_paths += report.write(self.report, os.fspath(self.data_path))
        self.info.metadata.update(series_fingerprint=fingerprint, manual_dir=manual_dir, empty_splits=empty,
                                  nodules_per_split=self.report['nodules_per_split'],
                                  keep_incomplete=self._keep_incomplete)
        by_split = {}
        for e in entries:
            if e['nodules_written']:
                split, fold = assignment[e['patient_id']]
                by_split.setdefault(split, []).append((e, fold))
        return {split: self._generate_examples(split, cache_dir, by_split[split]) for split in splits_lib.SPLITS
                if split in by_split}

    def _generate_examples(self, split: str, cache_dir: str, series: list[tuple[dict, int]]):
        load = functools.partial(_series_examples, cache_dir)
        if self._use_beam:
            return beam.Create(series) | f'{split}_series' >> beam.FlatMap(load)
        return (example for item in series for example in load(item))


def _series_pool(num_workers: int) -> multiprocessing.pool.Pool:
    """Processes for the series, forked from a server process that imported the series code (tfds, pydicom, SimpleITK,
    pyradiomics) once: spawned workers each paid those imports, seconds per worker, before their first series. It
    starts now, so its imports overlap the discovery of the series. ITK's threads are shared out among the workers."""
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload(['tfds_lidc.series_examples', 'tfds_lidc.radiomics_features'])
    return context.Pool(num_workers, initializer=_share_threads, initargs=(num_workers,))


def _share_threads(num_workers: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, (os.cpu_count() or 1) // num_workers))


def _series_examples(cache_dir: str, item: tuple[dict, int]) -> list[tuple[str, dict]]:
    entry, fold = item
    return series_examples.tfds_examples(cache_dir, entry, fold)
