"""Library entry point that builds the dataset from a manual_dir and says what it did."""
from __future__ import annotations

import functools
import os
import re
import shutil

import tensorflow_datasets as tfds

from tfds_lidc import file_lock
from tfds_lidc import report
from tfds_lidc import series_cache
from tfds_lidc.errors import LidcDataError
from tfds_lidc import nodule_table
from tfds_lidc.lidc_idri import Builder
from tfds_lidc.nodule_table import table_report

DATASETS = ('lidc_idri', 'nodule_table')


class DatasetExistsError(LidcDataError, RuntimeError):
    """data_dir already holds this dataset, built from other series."""


class ManualDirError(LidcDataError, FileNotFoundError):
    """The manual_dir is missing or empty."""


class DatasetLockedError(LidcDataError, RuntimeError):
    """Another prepare is building the same builder config into the same data_dir."""


LOCK_NAME = 'prepare.lock'  # in <data_dir>/lidc_idri/<config>/, beside the version folders


def _refusal(builder: Builder, path: str, holder: dict) -> DatasetLockedError:
    return DatasetLockedError(
        f'{builder.name}/{builder.builder_config.name} in {builder.data_dir_root} is being built by another prepare '
        f'({file_lock.describe(holder, path)}): wait for it to end and run this command again (it then reuses the '
        f'dataset), or use another --data_dir' + file_lock.end_of_advice(holder, path, 'build'))


def _remove_leftovers(builder: Builder, cache_dir: str) -> None:
    """Removes what an interrupted build of this builder config left (TFDS's incomplete.* folder of the version,
    the series cache's temporary files) and names it; only called with the config's lock held, so nothing of a
    running build is touched."""
    version_dir = os.fspath(builder.data_path)
    pattern = re.compile(rf'incomplete\.[A-Z0-9]{{6}}_{re.escape(os.path.basename(version_dir))}')
    config_dir = os.path.dirname(version_dir)
    leftovers = [os.path.join(config_dir, name) for name in sorted(os.listdir(config_dir)) if pattern.fullmatch(name)]
    for path in leftovers:
        shutil.rmtree(path)
    leftovers += series_cache.remove_temporary_files(cache_dir)
    if leftovers:
        print(f'Removed what an interrupted build of {builder.name}/{builder.builder_config.name} left: '
              f'{", ".join(leftovers)}', flush=True)


def _series_fingerprint(builder: Builder, manual_dir: str, download_dir: str) -> str:
    if isinstance(builder, nodule_table.Builder):
        return builder.input_fingerprint(manual_dir, download_dir)
    tasks, _ = builder.series_tasks(manual_dir, builder.series_cache_dir(download_dir))
    return series_cache.fingerprint(
        series_cache.key(os.path.join(manual_dir, t.series_dir), t.cache_config()) for t in tasks)


def prepare(manual_dir: str, data_dir: str, builder_config: str | None = None, num_workers: int = 1,
            overwrite: bool = False, keep_incomplete: bool = False, dataset: str = 'lidc_idri') -> str:
    """Builds lidc_idri/<builder_config> from LIDC-IDRI (TCIA layout) in `manual_dir` (or with dataset='nodule_table'
    nodule_table/<builder_config> from the nodules.csv in `manual_dir`); returns the dataset dir.

    Fails with the manual download instructions when `manual_dir` is missing or empty. When data_dir already
    holds the dataset, it is reused if it was built from the same series (same files, config and builder
    version) and otherwise refused unless `overwrite`. Series are converted over `num_workers` processes, each
    series' result cached in <data_dir>/downloads/lidc_idri/<config>/ so that an interrupted build resumes. Prints a
    summary; build_report.json is written in the dataset dir (and in the cache dir, also when the build fails).

    One prepare of a builder config runs in a data_dir at a time: it holds <data_dir>/lidc_idri/<config>/prepare.lock,
    and a second one is refused (DatasetLockedError naming the holder). What an interrupted build left is removed
    and named first. A nodule with readers' marks on slices its series lacks is skipped and named, unless
    `keep_incomplete` (then it is written from the slices there are, flagged `complete` False).
    """
    if dataset not in DATASETS:
        raise ManualDirError(f'unknown dataset {dataset!r}; use one of {", ".join(DATASETS)}.')
    builder_class = nodule_table.Builder if dataset == 'nodule_table' else Builder
    if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
        raise ManualDirError(f'manual_dir {manual_dir!r} does not exist or is empty.\n'
                                f'{builder_class.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    manual_dir = os.path.abspath(manual_dir)
    make = functools.partial(builder_class, data_dir=data_dir, config=builder_config, num_workers=num_workers,
                             keep_incomplete=keep_incomplete)
    builder = make()
    lock = os.path.join(os.path.dirname(os.fspath(builder.data_path)), LOCK_NAME)
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with file_lock.hold(lock, functools.partial(_refusal, builder, lock)):
        # Made again under the lock, so that it sees the data_dir as the lock's last holder left it.
        return _prepare(make(), manual_dir, overwrite)


def _prepare(builder: Builder, manual_dir: str, overwrite: bool) -> str:
    """`prepare` with the builder config's lock held."""
    dataset_dir = os.fspath(builder.data_dir)
    download_dir = os.path.join(os.fspath(builder.data_dir_root), 'downloads')
    _remove_leftovers(builder, builder.series_cache_dir(download_dir))
    if builder.data_path.exists() and not overwrite:
        stored = builder.info.metadata.get('series_fingerprint')
        if stored != _series_fingerprint(builder, manual_dir, download_dir):
            raise DatasetExistsError(
                f'{dataset_dir} holds {builder.info.full_name} built from other series or with other options '
                f"(manual_dir {builder.info.metadata.get('manual_dir', 'unknown')}, keep_incomplete "
                f"{builder.info.metadata.get('keep_incomplete', False)}); pass --overwrite to rebuild it "
                f'from {manual_dir}, or choose another --data_dir.')
        print(f'{builder.info.full_name} in {dataset_dir} was built from the same series; reused '
              f'(report: {os.path.join(dataset_dir, report.REPORT_NAME)}).', flush=True)
        return dataset_dir
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite else None
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, **({'download_mode': mode} if mode else {}))
    try:
        builder.download_and_prepare(download_dir=download_dir, download_config=config)
    finally:
        if builder.report is not None:
            done = builder.data_path.exists()
            path = os.path.join(dataset_dir, report.REPORT_NAME) if done else builder.report_paths[0]
            summary = table_report.summary if isinstance(builder, nodule_table.Builder) else report.summary
            print(summary(builder.report, path), flush=True)
    return dataset_dir
