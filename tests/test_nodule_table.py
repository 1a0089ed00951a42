"""The nodule_table dataset: a CSV of nodules builds the lidc_idri examples of the same nodules; bad rows and a bad CSV
are named in one line each; labels given or rated are read by the label protocols."""
import csv
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow_datasets as tfds

import tfds_lidc
from tfds_lidc import ct_series, nodules as nodules_lib, xml_reader
from tfds_lidc.nodule_table import CSV_NAME, TableError

CONFIG = 'crop32_1mm'
FEATURES = ('ct', 'mask', 'radiomics', 'ratings', 'attributes', 'label', 'centroid_mm', 'diameter_mm')


def _examples(name: str, data_dir: str) -> list[dict]:
    builder = tfds.builder(f'{name}/{CONFIG}', data_dir=data_dir)
    out = []
    for split in builder.info.splits.keys():
        source = tfds.data_source(f'{name}/{CONFIG}', data_dir=data_dir, split=split)
        out += [dict(source[i], split=split) for i in range(len(source))]
    return out


def _write_csv(path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _consensus_masks(series_dir: str) -> list[tuple[sitk.Image, np.ndarray]]:
    """Each nodule's consensus mask on the series' whole grid and its readers' ratings, as lidc_idri makes them."""
    series = ct_series.load_ct_series(series_dir)
    xml = next(os.path.join(series_dir, f) for f in os.listdir(series_dir) if f.endswith('.xml'))
    annotations, _ = nodules_lib.place_annotations(xml_reader.parse_reader_xml(xml), series.sop_uids,
                                                   series.z_positions, float(np.median(np.diff(series.positions))))
    out = []
    for cluster in nodules_lib.cluster_annotations(annotations, tol=series.slice_thickness):
        kept, _ = nodules_lib.select_readers(cluster)
        block = nodules_lib.consensus_mask_image(kept, series.image, 0.5)
        whole = sitk.Resample(block, series.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        out.append((whole, nodules_lib.reader_ratings(kept)[:, -1]))
    return out


@pytest.fixture(scope='module')
def both_ways(tmp_path_factory):
    """(lidc_idri examples, nodule_table examples, table report) of the same demo scans: the table gives each scan's
    nodules once by its reader XML and once by mask files (NRRD) with the readers' ratings as the label."""
    root = tmp_path_factory.mktemp('both_ways')
    scans, data_dir = root / 'scans', str(root / 'tfds')
    series_dirs = tfds_lidc.synth.generate(str(scans), 3, seed=0, verbose=False)
    tfds_lidc.prepare(str(scans), data_dir, CONFIG)
    rows = []
    for series_dir in series_dirs:
        rel = os.path.relpath(series_dir, scans)
        patient = rel.split(os.sep)[0]
        rows.append({'ct': rel, 'xml': os.path.join(rel, '069.xml'), 'patient_id': patient, 'label': ''})
        for k, (mask, ratings) in enumerate(_consensus_masks(series_dir)):
            sitk.WriteImage(mask, str(scans / f'{patient}_{k}.nrrd'))
            rows.append({'ct': rel, 'mask': f'{patient}_{k}.nrrd', 'patient_id': patient,
                         'label': ';'.join(str(r) for r in ratings if r > 0) + ';', 'site': f'site {k}'})
    _write_csv(scans / CSV_NAME, rows)
    tfds_lidc.prepare(str(scans), data_dir, CONFIG, dataset='nodule_table')
    with open(os.path.join(data_dir, 'nodule_table', CONFIG, '1.0.0', 'build_report.json')) as f:
        report = json.load(f)
    return _examples('lidc_idri', data_dir), _examples('nodule_table', data_dir), report


def test_table_examples_equal_the_lidc_idri_examples_of_the_same_nodules(both_ways):
    lidc, table, report = both_ways
    assert len(lidc) >= 3 and len(table) == 2 * len(lidc)
    assert report['nodules_written'] == len(table) and not report['skipped_reasons']
    by_key = {(e['series_uid'], int(e['nodule_index'])): e for e in lidc}
    from_xml = [e for e in table if e['mask_source'].decode().startswith('consensus')]
    from_masks = [e for e in table if e['mask_source'].decode().startswith('mask file')]
    assert len(from_xml) == len(from_masks) == len(lidc)
    for e in from_xml:
        want = by_key[(e['series_uid'], int(e['nodule_index']))]
        for name in FEATURES:
            np.testing.assert_array_equal(e[name], want[name], err_msg=name)
        assert e['label_source'] == b'ratings' and e['patient_id'] == want['patient_id']
    for e in from_masks:  # matched by position: the nearest lidc_idri nodule of the same series
        same_series = [w for w in lidc if w['series_uid'] == e['series_uid']]
        want = min(same_series, key=lambda w: np.linalg.norm(w['centroid_mm'] - e['centroid_mm']))
        for name in ('ct', 'mask', 'radiomics', 'centroid_mm', 'diameter_mm', 'ratings', 'label'):
            np.testing.assert_allclose(e[name], want[name], rtol=1e-6, err_msg=name)
        assert json.loads(e['metadata'])['site'].startswith('site ')
    # Splits by patient, as lidc_idri's: every nodule of a patient in one split, the same split in both datasets.
    split_of = {e['patient_id']: e['split'] for e in lidc}
    assert all(split_of[e['patient_id']] == e['split'] for e in table)
