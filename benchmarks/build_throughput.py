"""Build throughput of lidc_idri on full-size demo series (every slice, 512^2, as LIDC-IDRI has them).

python benchmarks/build_throughput.py [--num_scans 4] [--config crop64_1mm] [--workers 1,2]
Prints seconds per series split into reading (DICOM -> HU volume), resampling (isotropic crop grid) and radiomics,
then nodules/s of whole builds at each worker count and the projected time for all of LIDC-IDRI on 16 cores.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tfds_lidc  # noqa: E402  pylint: disable=g-import-not-at-top
from tfds_lidc import crop, ct_series, nodule_sample, nodules, radiomics_features, xml_reader  # noqa: E402

LIDC_SERIES = 1018
PROJECTED_CORES = 16


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
    parser.add_argument('--num_scans', type=int, default=4)
    parser.add_argument('--config', default='crop64_1mm')
    parser.add_argument('--workers', default='1,2')
    args = parser.parse_args()
    crop_size = int(args.config[4:].split('_')[0])
    with tempfile.TemporaryDirectory() as tmp:
        manual = os.path.join(tmp, 'manual')
        dirs = tfds_lidc.synth.generate(manual, args.num_scans, seed=0, full_size=True, verbose=False)
        slices = [len(ct_series.dicom_files(d)) for d in dirs]
        stages = np.array([stage_seconds(d, crop_size)[:3] for d in dirs])
        rows = []
        for workers in (int(w) for w in args.workers.split(',')):
            start = time.perf_counter()
            data = tfds_lidc.prepare(manual, os.path.join(tmp, f'data{workers}'), args.config, num_workers=workers)
            seconds = time.perf_counter() - start
            nodules_written = json.load(open(os.path.join(data, 'build_report.json')))['nodules_written']
            rows.append((workers, nodules_written, seconds))
    read, resample, radiomics = stages.mean(0)
    print(f'\nlidc_idri/{args.config} on {len(dirs)} full-size demo series ({np.mean(slices):.0f} slices of 512^2 '
          f'on average; {os.cpu_count()} CPUs):')
    print(f'seconds per series: reading {read:.2f}, resampling {resample:.2f}, radiomics {radiomics:.2f}')
    print('| workers | nodules | seconds | nodules/s | series/s | projected LIDC-IDRI, 16 cores |')
    print('|---|---|---|---|---|---|')
    for workers, count, seconds in rows:
        series_per_s = len(dirs) / seconds
        # Projection: the per-worker series rate of this run, times 16 workers (assumes linear scaling).
        projected = LIDC_SERIES / (series_per_s / workers * PROJECTED_CORES) / 60
        print(f'| {workers} | {count} | {seconds:.1f} | {count / seconds:.2f} | {series_per_s:.3f} | '
              f'{projected:.0f} min |')


if __name__ == '__main__':
    main()
