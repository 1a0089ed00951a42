"""Helpers shared by the tests: reading the generated datasets and a run's predictions back, tiny configs."""
import csv
import os
import sys

import numpy as np
import tensorflow_datasets as tfds

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import autorad_lung  # noqa: E402

CONFIG = 'crop32_1mm'
NUM_SCANS = 3  # scans of the native-resolution build of the tfds_lidc tests


def read_all(data_dir: str) -> dict:
    """{(series_uid, nodule_index): example} over the dataset's splits, read through tfds.data_source."""
    out = {}
    for split in tfds.builder(f'lidc_idri/{CONFIG}', data_dir=data_dir).info.splits.keys():
        source = tfds.data_source(f'lidc_idri/{CONFIG}', data_dir=data_dir, split=split)
        for i in range(len(source)):
            ex = source[i]
            out[(ex['series_uid'].decode(), int(ex['nodule_index']))] = dict(ex, split=split)
    return out


def tiny_config(data_dir: str, **data):
    config = autorad_lung.get_config("tiny")
    config.data.data_dir = data_dir
    for k, v in data.items():
        config.data[k] = v
    return config


def read_split(data_dir: str, split: str) -> list[dict]:
    source = tfds.data_source("lidc_idri/crop32_1mm", data_dir=data_dir, split=split, download=False)
    return [source[i] for i in range(len(source))]


def read_predictions(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N], class probabilities [N, C]) of a report's predictions.csv."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in rows])
    return np.array([int(r["label"]) for r in rows]), probs
