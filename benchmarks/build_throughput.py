"""Build throughput of lidc_idri (nodules/s) at 1 and 2 worker processes on demo data.

python benchmarks/build_throughput.py [--num_scans 12] [--config crop64_1mm]
Prints nodules/s per worker count and the projected time for all of LIDC-IDRI.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tfds_lidc  # noqa: E402  pylint: disable=g-import-not-at-top

LIDC_NODULES = 2600   # nodules with characteristics (>= 3 mm) in LIDC-IDRI
LIDC_SERIES = 1018


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--num_scans', type=int, default=12)
    parser.add_argument('--config', default='crop64_1mm')
    parser.add_argument('--workers', default='1,2')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        manual = os.path.join(tmp, 'manual')
        tfds_lidc.synth.generate(manual, args.num_scans, seed=0, verbose=False)
        rows = []
        for workers in (int(w) for w in args.workers.split(',')):
            start = time.perf_counter()
            data = tfds_lidc.prepare(manual, os.path.join(tmp, f'data{workers}'), args.config, num_workers=workers)
            seconds = time.perf_counter() - start
            nodules = json.load(open(os.path.join(data, 'build_report.json')))['nodules_written']
            rows.append((workers, nodules, seconds, nodules / seconds))
    print(f'\nlidc_idri/{args.config} on {args.num_scans} demo series ({os.cpu_count()} CPUs):')
    print('| workers | nodules | seconds | nodules/s | projected LIDC-IDRI (2600 nodules) |')
    print('|---|---|---|---|---|')
    for workers, nodules, seconds, rate in rows:
        print(f'| {workers} | {nodules} | {seconds:.1f} | {rate:.2f} | {LIDC_NODULES / rate / 60:.0f} min (+ reading '
              f'{LIDC_SERIES} full-size series) |')


if __name__ == '__main__':
    main()
