"""Build throughput of lidc_idri on full-size demo series (every slice, 512^2, as LIDC-IDRI has them).

python benchmarks/build_throughput.py [--num_scans 8] [--config crop64_1mm] [--workers 1,2]
Prints seconds per series split into reading (DICOM -> HU volume, XML, clustering), resampling (consensus mask,
isotropic crop grid) and radiomics, timed stage by stage in this process, and writing (the dataset written again from
the series cache, per series); then whole builds at each worker count: nodules/s, series/s, the speed-up over one
worker and the time all of LIDC-IDRI's series would take at that measured rate.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

import machine

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tfds_lidc  # noqa: E402  pylint: disable=g-import-not-at-top
from tfds_lidc import crop, ct_series, nodule_sample, nodules, radiomics_features, xml_reader  # noqa: E402

LIDC_SERIES = 1018


def stage_seconds(series_dir: str, crop_size: int) -> tuple[float, float, float, int]:
    """(reading, resampling, radiomics) seconds and the nodule count of one series, stage by stage."""
    start = time.perf_counter()
    series = ct_series.load_ct_series(series_dir)
    xml = next(os.path.join(series_dir, f) for f in os.listdir(series_dir) if f.endswith('.xml'))
    anns, _ = nodules.place_annotations(xml_reader.parse_reader_xml(xml), series.sop_uids, series.z_positions,
                                        float(np.median(np.diff(series.positions))))
    clusters = nodules.cluster_annotations(anns, series.slice_thickness)
    read = time.perf_counter() - start
    resample = radiomics = 0.0
    for cluster in clusters:
        kept, _ = nodules.select_readers(cluster)
        start = time.perf_counter()
        mask = nodules.consensus_mask_image(kept, series.image, 0.5)
        if mask is None:
            continue
        grid, _ = crop.nodule_grid(mask, nodule_sample.centroid_mm(mask), crop_size, 1.0)
        roi_ct, roi_mask = crop.resample_ct(series.image, grid), crop.resample_mask(mask, grid)
        resample += time.perf_counter() - start
        start = time.perf_counter()
        radiomics_features.extract(roi_ct, roi_mask)
        radiomics += time.perf_counter() - start
    return read, resample, radiomics, len(clusters)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--num_scans', type=int, default=8)
    parser.add_argument('--config', default='crop64_1mm')
    parser.add_argument('--workers', default='1,2', help='worker counts, one build each, in this order (1,2,1,2 '
                        'alternates; the speed-up is against the median of the one-worker builds)')
    args = parser.parse_args()
    crop_size = int(args.config[4:].split('_')[0])
    with tempfile.TemporaryDirectory() as tmp:
        manual = os.path.join(tmp, 'manual')
        dirs = tfds_lidc.synth.generate(manual, args.num_scans, seed=0, full_size=True, verbose=False,
                                        num_workers=os.cpu_count() or 1)
        slices = [len(ct_series.dicom_files(d)) for d in dirs]
        stages = np.array([stage_seconds(d, crop_size)[:3] for d in dirs])
        rows = []
        for workers in (int(w) for w in args.workers.split(',')):
            start = time.perf_counter()
            root = os.path.join(tmp, f'data{len(rows)}')
            data = tfds_lidc.prepare(manual, root, args.config, num_workers=workers)
            seconds = time.perf_counter() - start
            nodules_written = json.load(open(os.path.join(data, 'build_report.json')))['nodules_written']
            rows.append((workers, nodules_written, seconds))
        start = time.perf_counter()  # every series is in the cache now: what is left is writing the records
        tfds_lidc.prepare(manual, root, args.config, overwrite=True)
        write = (time.perf_counter() - start) / len(dirs)
    read, resample, radiomics = stages.mean(0)
    print(f'\nlidc_idri/{args.config} on {len(dirs)} full-size demo series ({np.mean(slices):.0f} slices of 512^2 '
          f'on average; {os.cpu_count()} CPUs):')
    print(f'seconds per series: reading {read:.2f}, resampling {resample:.2f}, radiomics {radiomics:.2f}, '
          f'writing {write:.2f}; load average {machine.load_average()}')
    print('| workers | nodules | seconds | nodules/s | series/s | speed-up over 1 worker | LIDC-IDRI at this rate |')
    print('|---|---|---|---|---|---|---|')
    one_worker = np.median([seconds for workers, _, seconds in rows if workers == 1] or [np.nan])
    for workers, count, seconds in rows:
        series_per_s = len(dirs) / seconds
        speedup = one_worker / seconds
        print(f'| {workers} | {count} | {seconds:.1f} | {count / seconds:.2f} | {series_per_s:.3f} | {speedup:.2f}x | '
              f'{LIDC_SERIES / series_per_s / 3600:.1f} h |')


if __name__ == '__main__':
    main()
