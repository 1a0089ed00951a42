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
from tfds_lidc import ct_series
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
        for k, (mask, ratings) in enumerate(tfds_lidc.synth.consensus_masks(series_dir)):
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
    assert report['nodules_written'] == len(table)
    assert set(report['skipped_reasons']) <= {'smaller than'}  # an XML's marks < 3 mm, skipped by lidc_idri too
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


@pytest.fixture(scope='module')
def hand_written(both_ways, tmp_path_factory):
    """A hand-written external cohort (every row `test`): a MetaImage CT with a mask row and a centre row, a DICOM
    series with a reader XML row, and four bad rows. Returns (manual_dir, data_dir, report, examples by row)."""
    root = tmp_path_factory.mktemp('hand_written')
    scans = root / 'cohort'
    series_dir = tfds_lidc.synth.generate(str(scans), 1, seed=1, verbose=False)[0]
    image = ct_series.load_ct_series(series_dir).image
    sitk.WriteImage(image, str(scans / 'scan.mhd'))
    mask, ratings = tfds_lidc.synth.consensus_masks(series_dir)[0]
    sitk.WriteImage(mask, str(scans / 'mask.nii.gz'))
    centre = image.TransformContinuousIndexToPhysicalPoint(
        [float(v) for v in np.argwhere(sitk.GetArrayViewFromImage(mask)).mean(0)[::-1]])
    xml = os.path.relpath(os.path.join(series_dir, '069.xml'), scans)
    rows = [
        {'ct': 'scan.mhd', 'mask': 'mask.nii.gz', 'patient_id': 'A', 'label': 'malignant'},
        {'ct': os.path.relpath(series_dir, scans), 'xml': xml, 'nodule_index': '0', 'patient_id': 'B', 'label': ''},
        {'ct': 'scan.mhd', 'coordX': centre[0], 'coordY': centre[1], 'coordZ': centre[2], 'diameter_mm': 9,
         'patient_id': 'C', 'label': '0'},
        {'ct': 'absent.nii.gz', 'mask': 'mask.nii.gz', 'patient_id': 'D', 'label': 'benign'},
        {'ct': 'scan.mhd', 'coordX': 0, 'coordY': 0, 'coordZ': 5000, 'diameter_mm': 9, 'patient_id': 'E',
         'label': 'benign'},
        {'ct': 'scan.mhd', 'coordX': centre[0], 'coordY': centre[1], 'coordZ': centre[2], 'diameter_mm': 6,
         'patient_id': 'F', 'label': 'probably'},
        {'ct': 'scan.mhd', 'mask': 'mask.nii.gz', 'patient_id': 'G', 'label': 'benign'},
    ]
    _write_csv(scans / CSV_NAME, [dict(r, split='test') for r in rows])
    data_dir = str(root / 'tfds')
    tfds_lidc.prepare(str(scans), data_dir, CONFIG, dataset='nodule_table')
    with open(os.path.join(data_dir, 'nodule_table', CONFIG, '1.0.0', 'build_report.json')) as f:
        report = json.load(f)
    examples = {int(e['row']): e for e in _examples('nodule_table', data_dir)}
    return scans, data_dir, report, examples, ratings


def test_a_mask_an_xml_and_a_centre_build_and_bad_rows_are_named_once(hand_written, capsys):
    scans, data_dir, report, examples, ratings = hand_written
    assert sorted(examples) == [1, 2, 3] and {e['split'] for e in examples.values()} == {'test'}
    assert [e['label'] for e in (examples[1], examples[3])] == [2, 0]  # malignant; 0 is benign
    assert examples[2]['label_source'] == b'ratings' and examples[1]['label_source'] == b'given'
    np.testing.assert_array_equal(examples[2]['ratings'][:np.count_nonzero(ratings)], ratings[ratings > 0])
    assert examples[3]['mask_source'].decode().startswith('sphere of diameter 9 mm at LPS (')
    # The mask row and the XML row give the same nodule on the same grid: the same crop.
    np.testing.assert_array_equal(examples[1]['mask'], examples[2]['mask'])
    skipped = {n['row']: n['reason'] for n in report['nodules'] if n['status'] == 'skipped'}
    assert sorted(skipped) == [4, 5, 6, 7] and all('\n' not in r for r in skipped.values())
    assert 'absent.nii.gz does not exist' in skipped[4]
    assert skipped[5].startswith('centre (0, 0, 5000) mm is outside the CT volume')
    assert skipped[6].startswith("unknown label 'probably'")
    assert skipped[7] == 'duplicate nodule: the same CT and nodule as row 1'
    assert sum(report['skipped_reasons'].values()) == 4 and report['sphere_masks'] == 1
    written = {n['row']: n for n in report['nodules'] if n['status'] == 'written'}
    assert written[3]['mask'].startswith('sphere') and written[1]['split'] == 'test'
    assert set(report['empty_splits']) == {'train', 'validation'}


def test_a_table_with_no_usable_row_or_no_label_column_is_one_line(hand_written, tmp_path):
    scans = hand_written[0]
    bad = tmp_path / 'bad'
    bad.mkdir()
    _write_csv(bad / CSV_NAME, [{'ct': str(scans / 'scan.mhd'), 'mask': 'nowhere.nrrd', 'patient_id': 'A',
                                 'label': 'benign'}, {'ct': 'none.mhd', 'mask': 'm.nrrd', 'patient_id': 'B',
                                                      'label': 'x'}])
    with pytest.raises(TableError) as e:
        tfds_lidc.prepare(str(bad), str(tmp_path / 'tfds'), CONFIG, dataset='nodule_table')
    assert '\n' not in str(e.value) and str(e.value).startswith(f'{bad / CSV_NAME}: no usable row among 2 (')
    _write_csv(bad / CSV_NAME, [{'ct': 'scan.mhd', 'mask': 'm.nrrd', 'patient_id': 'A'}])
    with pytest.raises(TableError, match=r"has no 'label' column \(columns: ct, mask, patient_id\)\.$"):
        tfds_lidc.prepare(str(bad), str(tmp_path / 'tfds2'), CONFIG, dataset='nodule_table')


def test_given_labels_and_ratings_under_the_label_protocols(hand_written):
    from autorad_jax.data import pipeline
    from lidc_testdata import tiny_config
    _, data_dir, _, examples, ratings = hand_written
    mean = ratings[ratings > 0].mean()
    for rule, scheme in (('mean', '3class'), ('mean_exclude3', 'binary'), ('mean_3malignant', 'binary')):
        config = tiny_config(data_dir, name='nodule_table', label_rule=rule, label_scheme=scheme, min_readers=2)
        rated = None if len(ratings[ratings > 0]) < 2 else (
            (0 if mean < 2.5 else 2 if mean > 3.5 else 1) if scheme == '3class'
            else (-1 if mean == 3 and rule.endswith('exclude3') else 0 if mean < 3 else 1))
        # Rows 1 (malignant) and 3 (benign) keep their given labels under every rule, with no readers.
        given = {1: 2 if scheme == '3class' else 1, 3: 0}
        want = sorted([*given.values(), *([rated] if rated not in (None, -1) else [])])
        recs = pipeline.records(config.data, 'test')
        assert sorted(recs.labels.tolist()) == want, rule


def _run(root, name: str, dataset: str, labels, probs, patients) -> str:
    from autorad_jax.train.reports import write_predictions
    workdir = root / name
    workdir.mkdir()
    write_predictions(str(workdir / 'predictions.csv'), labels, probs, ('benign', 'malignant'), patients)
    (workdir / 'metrics.json').write_text(json.dumps({'dataset': dataset, 'split': 'test'}))
    return str(workdir)


def test_unpaired_comparison_equals_a_brute_force_loop_over_independent_resamples(tmp_path):
    from sklearn import metrics as skm
    from autorad_jax.train import compare
    rng = np.random.default_rng(0)
    la, lb = rng.integers(2, size=24), rng.integers(2, size=15)
    pa, pb = rng.uniform(0.05, 0.95, 24), rng.uniform(0.05, 0.95, 15)
    pa[la == 1] = np.clip(pa[la == 1] + 0.3, 0, 0.99)
    patients_a = np.array([f'LIDC-IDRI-{i // 2:04d}' for i in range(24)])  # sorted ids: patient p is ids[p]
    patients_b = np.array([f'C{i // 3:02d}' for i in range(15)])
    a = _run(tmp_path, 'lidc', 'lidc_idri/crop32_1mm', la, np.stack([1 - pa, pa], 1), patients_a)
    b = _run(tmp_path, 'external', 'nodule_table/crop32_1mm', lb, np.stack([1 - pb, pb], 1), patients_b)
    result = compare.compare([a, b], str(tmp_path / 'out'), replicates=120, seed=5)
    pair = result['pairs'][0]
    assert pair['paired'] is False and 'UNPAIRED' in compare.format_table(result)
    draws_a = np.random.default_rng(5).integers(12, size=(120, 12))
    draws_b = np.random.default_rng(6).integers(5, size=(120, 5))
    auc, brier = [], []
    for ra, rb in zip(draws_a, draws_b):
        ia = np.concatenate([np.flatnonzero(patients_a == f'LIDC-IDRI-{p:04d}') for p in ra])
        ib = np.concatenate([np.flatnonzero(patients_b == f'C{p:02d}') for p in rb])
        brier.append(skm.brier_score_loss(lb[ib], pb[ib]) - skm.brier_score_loss(la[ia], pa[ia]))
        one_class = len(set(la[ia])) < 2 or len(set(lb[ib])) < 2
        auc.append(np.nan if one_class else skm.roc_auc_score(lb[ib], pb[ib]) - skm.roc_auc_score(la[ia], pa[ia]))
    auc, brier = np.array(auc), np.array(brier)
    d = pair['metrics']['brier']
    assert d['difference'] == pytest.approx(skm.brier_score_loss(lb, pb) - skm.brier_score_loss(la, pa))
    assert d['ci95'] == pytest.approx(list(np.percentile(brier, [2.5, 97.5])))
    assert d['p_value'] == pytest.approx(min(1.0, 2 * min(np.mean(brier <= 0), np.mean(brier >= 0))))
    d = pair['metrics']['auc_macro']
    assert d['difference'] == pytest.approx(skm.roc_auc_score(lb, pb) - skm.roc_auc_score(la, pa))
    assert d['ci95'] == pytest.approx(list(np.nanpercentile(auc, [2.5, 97.5])))
    assert d['undefined_replicates'] == int(np.isnan(auc).sum())


def test_a_synth_cohort_trains_and_validates_a_lidc_run_externally_compared_unpaired(lidc_data, tmp_path):
    """A demo cohort (synth --layout table) builds, trains a tiny model, and evaluates a tiny LIDC-IDRI run as an
    external test set with one command; the LIDC test split and the cohort are then compared unpaired."""
    import subprocess
    import sys
    from autorad_jax.train import compare, trainer
    from lidc_testdata import tiny_config
    cohort = tmp_path / 'cohort'
    tfds_lidc.synth.generate_table(str(cohort), 4, seed=1, split=None, verbose=False)
    tfds_lidc.prepare(str(cohort), str(tmp_path / 'split_by_patient'), CONFIG, dataset='nodule_table')
    rows = list(csv.DictReader(open(cohort / CSV_NAME)))
    _write_csv(cohort / CSV_NAME, [dict(r, split='test') for r in rows])  # the same cohort as an external test set
    external = str(tmp_path / 'external')
    tfds_lidc.prepare(str(cohort), external, CONFIG, dataset='nodule_table')

    def train(data_dir: str, name: str, workdir: str) -> dict:
        config = tiny_config(data_dir, name=name, batch_size=8, eval_batch_size=8, label_scheme='binary',
                             label_rule='mean_exclude3')
        config.train.update(num_steps=2, log_every=1, eval_every=2, checkpoint_every=2)
        return trainer.train_and_evaluate(config, workdir)
    on_cohort = train(str(tmp_path / 'split_by_patient'), 'nodule_table', str(tmp_path / 'cohort_run'))
    assert on_cohort['step'] == 2 and 'ci95' in on_cohort['test']
    lidc_run = str(tmp_path / 'lidc_run')
    train(lidc_data, 'lidc_idri', lidc_run)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, 'run.py', 'eval', '--workdir', lidc_run, '--config.data.name=nodule_table',
                           '--data_dir', external, '--json'], capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    report = os.path.join(lidc_run, 'external', 'nodule_table')
    with open(os.path.join(report, 'metrics.json')) as f:
        saved = json.load(f)
    assert saved['dataset'] == 'nodule_table/crop32_1mm' and saved['num_examples'] == len(rows)
    assert metrics['bootstrap']['patients'] == 4 and metrics['ci95']['accuracy'] is not None
    with open(os.path.join(lidc_run, 'metrics.json')) as f:  # the run's own LIDC test report is left as it was
        assert json.load(f)['dataset'] == 'lidc_idri/crop32_1mm'
    result = compare.compare([lidc_run, report], str(tmp_path / 'comparison'), replicates=50)
    pair = result['pairs'][0]
    assert not pair['paired'] and pair['nodules_b'] == len(rows) and not result['bootstrap']['paired']
    accuracy = pair['metrics']['accuracy']
    assert accuracy['b'] == pytest.approx(metrics['accuracy'])
    assert accuracy['difference'] == pytest.approx(metrics['accuracy'] - accuracy['a'])


def test_beam_direct_runner_builds_the_same_table(hand_written, tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions
    scans, _, _, examples, _ = hand_written
    builder = tfds_lidc.nodule_table.Builder(data_dir=str(tmp_path), config=CONFIG)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(scans), beam_options=PipelineOptions(['--runner=DirectRunner'])))
    beam_examples = {int(e['row']): e for e in _examples('nodule_table', str(tmp_path))}
    assert beam_examples.keys() == examples.keys()
    for row, e in examples.items():
        for name in (*FEATURES, 'mask_source', 'split', 'metadata'):
            np.testing.assert_array_equal(beam_examples[row][name], e[name], err_msg=name)
