"""Library entry point that builds the dataset from a manual_dir."""
from __future__ import annotations

import os

import tensorflow_datasets as tfds

from tfds_lidc.lidc_idri import Builder


def prepare(manual_dir: str, data_dir: str, builder_config: str | None = None, num_workers: int = 1) -> str:
    """Builds lidc_idri/<builder_config> from LIDC-IDRI (TCIA layout) in `manual_dir`; returns the dataset dir.

    Fails with the manual download instructions when `manual_dir` is missing or empty. Series are
    converted over `num_workers` processes; build_report.json is written in the dataset dir.
    """
    if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
        raise FileNotFoundError(f'manual_dir {manual_dir!r} does not exist or is empty.\n'
                                f'{Builder.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    builder = Builder(data_dir=data_dir, config=builder_config, num_workers=num_workers)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return os.fspath(builder.data_dir)
