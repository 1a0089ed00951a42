"""lidc_idri: LIDC-IDRI lung nodules (3D CT crop, consensus mask, radiomics, reader ratings)."""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils.lazy_imports_utils import apache_beam as beam

from tfds_lidc import radiomics_features
from tfds_lidc import report
from tfds_lidc import series_examples
from tfds_lidc import splits as splits_lib
from tfds_lidc import xml_reader

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download LIDC-IDRI from The Cancer Imaging Archive (https://www.cancerimagingarchive.net/collection/lidc-idri/)
with the NBIA Data Retriever: the CT images (DICOM, ~124 GB) and the radiologist annotations (XML).
Place them in `manual_dir` in the TCIA layout, one folder per patient and one folder per series:

  <manual_dir>/LIDC-IDRI-0001/<StudyInstanceUID or study folder>/<SeriesInstanceUID or series folder>/*.dcm
  <manual_dir>/LIDC-IDRI-0001/<study>/<series>/<reader XML>.xml     (LidcReadMessage, http://www.nih.gov)
  ...
  <manual_dir>/LIDC-IDRI-1012/...

Every folder that holds .dcm files is one series; its reader XML must sit next to its slices (as in the
TCIA download; the XML archive "LIDC-XML-only" can be unpacked into the matching series folders).
Non-CT series (CR/DX radiographs) are skipped and listed in build_report.json.
For a small local demo in the same layout: `python run.py synth --out DIR --num_scans N`.
"""


@dataclasses.dataclass(eq=False)
class LidcIdriConfig(tfds.core.BuilderConfig):
    """Crop geometry and consensus of one dataset variant."""
    crop_size: int = 64
    spacing_mm: float = 1.0
    consensus_level: float = 0.5
    radiomics_params: str = radiomics_features.DEFAULT_PARAMS


def _with_progress(results: Iterable[list[tuple[str, dict]]], total: int, split: str) -> Iterator[tuple[str, dict]]:
    """Yields the examples of each series' result list, with a progress bar over series."""
    with tfds.core.utils.tqdm(total=total, desc=f'lidc_idri {split}', unit=' series') as bar:
        for examples in results:
            bar.update(1)
            yield from examples


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for LIDC-IDRI nodules."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        LidcIdriConfig(name='crop64_1mm', description='64^3 crop at 1 mm isotropic.', crop_size=64),
        LidcIdriConfig(name='crop32_1mm', description='32^3 crop at 1 mm isotropic.', crop_size=32),
    ]
    DEFAULT_CONFIG_NAME = 'crop64_1mm'

    def __init__(self, *, num_workers: int = 1, **kwargs):
        self._num_workers = num_workers
        self._use_beam = False
        self._map = map
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
            }),
            supervised_keys=None,
            homepage='https://www.cancerimagingarchive.net/collection/lidc-idri/',
            metadata=tfds.core.MetadataDict(meta),
        )

    def _download_and_prepare(self, dl_manager, download_config=None):
        self._use_beam = bool(download_config and (download_config.beam_runner or download_config.beam_options))
        pool = None
        if not self._use_beam and self._num_workers > 1:
            pool = multiprocessing.get_context('spawn').Pool(self._num_workers)
        self._map = pool.imap_unordered if pool is not None else map
        try:
            super()._download_and_prepare(dl_manager, download_config)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        report.merge_parts(os.fspath(self.data_path))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)  # TFDS raises, with the instructions, if missing or empty
        series = series_examples.discover_series(manual_dir)
        if not series:
            raise AssertionError(f'No DICOM series found under {manual_dir}. '
                                 f'Manual download instructions:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
        # Splits are dealt over patients whose reader XML lists a nodule, so that none is left empty
        # by patients without nodules; the others are still read (and reported) under train.
        with_nodules = {pid for rel, pid in series if series_examples.lists_nodules(os.path.join(manual_dir, rel))}
        assignment = splits_lib.assign(sorted(with_nodules))
        assignment.update({pid: ('train', f) for pid, (_, f) in
                           splits_lib.assign([p for _, p in series if p not in with_nodules]).items()})
        cfg = self.builder_config
        tasks = {'train': [], 'validation': [], 'test': []}
        for rel, pid in series:
            split, fold = assignment[pid]
            tasks[split].append(series_examples.SeriesTask(
                manual_dir=manual_dir, series_dir=rel, patient_id=pid, split=split, fold=fold,
                crop_size=cfg.crop_size, spacing_mm=cfg.spacing_mm, consensus_level=cfg.consensus_level,
                radiomics_params=cfg.radiomics_params, report_dir=os.fspath(self.data_path)))
        return {split: self._generate_examples(split, t) for split, t in tasks.items()}

    def _generate_examples(self, split: str, tasks: list[series_examples.SeriesTask]):
        if self._use_beam:
            return beam.Create(tasks) | f'{split}_series' >> beam.FlatMap(series_examples.series_examples)
        return _with_progress(self._map(series_examples.series_examples, tasks), len(tasks), split)
