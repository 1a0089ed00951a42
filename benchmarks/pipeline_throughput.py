r"""Input-pipeline throughput: training images/s of the grain pipeline on this host's CPUs and the bytes per image it
sends to the devices (int16 HU views + radiomics + label: windowing, augmentation and resizing run on the devices),
against what the train step consumes.

  python benchmarks/pipeline_throughput.py --config configs/autorad_lung.py:large \
      --config.data.data_dir=/data/tensorflow_datasets --worker_counts 0,4,8 --train_json train.json
(--train_json: rows written by train_throughput.py --json_out; the fastest JAX step sets the images/s to beat.)
"""

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from autorad_jax.data import pipeline

config_flags.DEFINE_config_file("config", "configs/autorad_lung.py:tiny", "Experiment config.", lock_config=True)
_WORKER_COUNTS = flags.DEFINE_list("worker_counts", ["0", "2"], "grain worker processes to try.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches, after the first.")
_MIN_RECORDS = flags.DEFINE_integer(
    "min_records", 1800, "Repeat a smaller training split's records to this many (LIDC-IDRI's has about 1,800).")
_TRAIN_JSON = flags.DEFINE_string("train_json", None, "train_throughput.py rows: the step's images/s to compare.")


def measure(config, workers: int) -> tuple[float, float]:
    """(images/s per host, bytes per image of a batch) of the training pipeline with `workers` grain processes."""
    config.data.worker_count = workers
    recs = pipeline.records(config.data, "train")
    if len(recs) < _MIN_RECORDS.value:  # grain's index shuffle costs more per record on tiny splits
        reps = -(-_MIN_RECORDS.value // len(recs))
        recs = pipeline.Records(*(np.concatenate([getattr(recs, f.name)] * reps)
                                  for f in dataclasses.fields(pipeline.Records)))
    stats = pipeline.RadiomicsStats.fit(recs.radiomics)
    batches = iter(pipeline.train_loader(config.data, recs, stats, seed=0))
    first = next(batches)  # start-up (worker processes, first reads) is not throughput
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
        next(batches)
    seconds = time.perf_counter() - start
    local_batch = config.data.batch_size // jax.process_count()
    return _BATCHES.value * local_batch / seconds, sum(v.nbytes for v in first.values()) / local_batch


def main(argv):
    del argv
    needed = None
    if _TRAIN_JSON.value:
        with open(_TRAIN_JSON.value) as f:
            needed = max(r["images_per_s"] for r in json.load(f) if r["impl"] == "jax") / jax.process_count()
    print("| grain workers | images/s per host | bytes per image to the devices | x train step needs |")
    print("| --- | --- | --- | --- |")
    for workers in map(int, _WORKER_COUNTS.value):
        rate, nbytes = measure(flags.FLAGS.config, workers)
        ratio = f"{rate / needed:.2f}x" if needed else "n/a"
        print(f"| {workers} | {rate:.1f} | {nbytes:.0f} | {ratio} |")


if __name__ == "__main__":
    app.run(main)
