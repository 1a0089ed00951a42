"""Trainer on generator data: learning, mesh equivalence, bitwise resume, cross-mesh restore, faults."""

import csv
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from sklearn.metrics import accuracy_score

from autorad_jax import cli as cli_lib
from autorad_jax import modeling
from autorad_jax.data import pipeline, preprocess
from autorad_jax.models.spec import ModelSpec
from autorad_jax.train import checkpointing, experiment, trainer, workdir_lock
from configs import autorad_lung
from compiled import forward
from fault_checks import assert_one_line_error, cli, snapshot
from lidc_testdata import read_predictions, read_split, tiny_config


def train_config(data_dir: str, num_steps: int = 6, **model):
    config = tiny_config(data_dir, batch_size=8, eval_batch_size=8)
    config.model.update(model)
    config.optim.update(learning_rate=1e-2, warmup_steps=2)
    config.train.update(num_steps=num_steps, log_every=1, eval_every=num_steps, checkpoint_every=num_steps // 2)
    return config


def losses(workdir: str) -> list[float]:
    with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def saved_state(workdir: str, step: int) -> list[np.ndarray]:
    """The 'state' item of a checkpoint, read back as host arrays without any target."""
    tree = ocp.StandardCheckpointer().restore(os.path.join(checkpointing.checkpoint_dir(workdir), str(step), "state"))
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def trained(lidc_data, tmp_path_factory):
    """An uninterrupted 6-step run of the tiny config on the default (8-device) mesh."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    config = train_config(lidc_data)
    result = trainer.train_and_evaluate(config, workdir)
    return config, workdir, result


def test_tiny_training_lowers_the_loss_and_writes_reports(lidc_data, tmp_path):
    config = train_config(lidc_data, num_steps=20)
    config.train.update(eval_every=20, checkpoint_every=20)
    result = trainer.train_and_evaluate(config, str(tmp_path))
    curve = losses(str(tmp_path))
    assert len(curve) == 20 and np.mean(curve[-5:]) < np.mean(curve[:5])
    assert result["step"] == 20 and 0.0 <= result["test"]["accuracy"] <= 1.0
    for name in ("metrics.json", "metrics.csv", "predictions.csv", "roc.png", "confusion.png", "reliability.png"):
        assert os.path.exists(tmp_path / name), name
    recs = pipeline.records(config.data, "test")
    with open(tmp_path / "predictions.csv") as f:
        predictions = list(csv.DictReader(f))
    assert [r["patient_id"] for r in predictions] == list(recs.patients)
    assert all(p.startswith("LIDC-IDRI-") for p in recs.patients)
    assert [int(r["label"]) for r in predictions] == recs.labels.tolist()
    saved = json.load(open(tmp_path / "metrics.json"))
    assert saved["bootstrap"]["patients"] == len(set(recs.patients)) and "accuracy" in saved["ci95"]
    assert os.listdir(tmp_path / "tensorboard")
    # What `run.py train` prints last: the test line's accuracy is the predictions' (scikit-learn), at the best step.
    summary = trainer.training_summary(result, str(tmp_path)).splitlines()
    probs = np.array([[float(r[k]) for k in r if k.startswith("prob_")] for r in predictions])
    test_line = re.fullmatch(r"test split, step (\d+): accuracy ([\d.]+) .*", summary[2])
    best = result["best_step"]
    assert int(test_line[1]) == best and summary[1].startswith("validation split, step 20: accuracy ")
    assert float(test_line[2]) == round(accuracy_score(recs.labels, probs.argmax(1)), 3)
    assert summary[3] == f"Report: {tmp_path / 'reports' / f'test_step{best}'}"
    assert os.path.isdir(summary[3].removeprefix("Report: "))


# data x fsdp x tensor (2, 2, 2) training is compared with one device in tests/test_scan_layers.py.
@pytest.mark.parametrize("mesh", [(2, 1, 4)], ids=["data2_tensor4"])
def test_mesh_gives_the_same_loss_curve_as_one_device(lidc_data, mesh):
    config = train_config(lidc_data)
    recs = pipeline.records(config.data, "train")
    stats = pipeline.RadiomicsStats.fit(recs.radiomics)
    it = iter(pipeline.train_loader(config.data, recs, stats, seed=0))
    batches = [next(it) for _ in range(4)]

    def run(shape):
        config.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
        exp = experiment.make_experiment(config, modeling.resolve_spec(config, pipeline.radiomics_names(config.data)))
        state, curve = exp.init_state(), []
        for b in batches:
            state, m = exp.train_step(state, pipeline.to_global(b, exp.batch_sharding))
            curve.append(float(m["loss"]))
        return curve, [np.asarray(x) for x in jax.tree.leaves(state)]

    curve1, params1 = run((1, 1, 1))
    curve8, params8 = run(mesh)
    np.testing.assert_allclose(curve8, curve1, rtol=1e-5)
    for a, b in zip(params8, params1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_resumed_run_matches_uninterrupted_run_bitwise(trained, tmp_path, monkeypatch):
    config, workdir, _ = trained
    reached = trainer._Preemption.reached

    def sigterm_at_step_3(self, step, manager):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler sets the flag
        return reached(self, step, manager)

    monkeypatch.setattr(trainer._Preemption, "reached", sigterm_at_step_3)
    first = trainer.train_and_evaluate(config, str(tmp_path))
    assert first == {"step": 3, "preempted": True}
    monkeypatch.setattr(trainer._Preemption, "reached", reached)
    second = trainer.train_and_evaluate(config, str(tmp_path))
    assert second["step"] == 6
    assert losses(str(tmp_path)) == losses(workdir)
    for a, b in zip(saved_state(str(tmp_path), 6), saved_state(workdir, 6)):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_from_eight_devices_restores_on_one(trained):
    config, workdir, _ = trained
    one = config.copy_and_resolve_references()
    one.mesh.update(data=1, fsdp=1, tensor=1)
    exp = experiment.make_experiment(one, modeling.resolve_spec(one, pipeline.radiomics_names(one.data)))
    manager = checkpointing.make_manager(workdir, 3, read_only=True)
    state = checkpointing.restore_state(manager, 6, exp.abstract_state)
    leaves = jax.tree.leaves(state)
    assert all(len(x.sharding.device_set) == 1 for x in leaves)
    for a, b in zip(leaves, saved_state(workdir, 6)):
        np.testing.assert_array_equal(np.asarray(a), b)
    one.data.data_dir = "no_dataset_here"  # eval reads the dataset where the training read it
    metrics = trainer.evaluate(one, workdir, split="test", step=6)
    written, probs = read_predictions(os.path.join(workdir, "reports", "test_step6", "predictions.csv"))
    labels = pipeline.records(config.data, "test").labels
    assert written.tolist() == labels.tolist()
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, probs.argmax(1)))


def test_incompatible_workdir_names_the_mismatch(trained):
    config, workdir, _ = trained
    other = config.copy_and_resolve_references()
    other.model.n_ctx = 6
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match=r"model\.n_ctx is 4 .* but 6 now"):
        trainer.train_and_evaluate(other, workdir)


def test_resume_may_change_what_does_not_shape_the_checkpoint_and_is_told_what(tmp_path):
    config, workdir = autorad_lung.get_config("tiny"), str(tmp_path)
    saved = config.to_dict()
    other = config.copy_and_resolve_references()
    other.data.batch_size *= 2
    other.optim.learning_rate /= 10
    other.model.dtype = "bfloat16"  # compute-only
    assert checkpointing.check_compatible(saved, other, workdir) == {
        "data.batch_size": (config.data.batch_size, other.data.batch_size),
        "model.dtype": (config.model.dtype, "bfloat16"),
        "optim.learning_rate": (config.optim.learning_rate, other.optim.learning_rate)}
    assert checkpointing.check_compatible(saved, config, workdir) == {}


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cross_validation_pools_the_folds_and_compares_the_models(lidc_data, tmp_path):
    from sklearn.metrics import roc_auc_score
    from autorad_jax.train import cv
    config = train_config(lidc_data, num_steps=2)
    config.cv.models = "radiomics_logreg, radiomics_mlp"
    summary = cv.cross_validate(config, str(tmp_path))
    per_fold = json.load(open(tmp_path / "cv_summary.json"))["folds"]
    for model in ("radiomics_logreg", "radiomics_mlp"):
        folds = per_fold[model]
        assert [f["cv_fold"] for f in folds] == list(range(cv.NUM_FOLDS))
        for metric in cv.SUMMARY_METRICS:
            values = np.array([np.nan if f[metric] is None else f[metric] for f in folds])
            s = summary[model][metric]
            assert (s["mean"], s["std"]) == pytest.approx((np.nanmean(values), np.nanstd(values, ddof=1)),
                                                          nan_ok=True)
            assert s["undefined_folds"] == np.flatnonzero(np.isnan(values)).tolist()
        # Out of fold: the five held-out folds' predictions, concatenated, and metrics computed on them.
        fold_rows = [row for k in range(cv.NUM_FOLDS)
                     for row in read_csv(tmp_path / model / f"fold{k}" / "predictions.csv")]
        pooled_rows = read_csv(tmp_path / model / "predictions.csv")
        assert [(r["patient_id"], r["label"], r["prob_malignant"]) for r in pooled_rows] == \
            [(r["patient_id"], r["label"], r["prob_malignant"]) for r in fold_rows]
        labels = np.array([int(r["label"]) for r in pooled_rows])
        probs = np.array([[float(r[f"prob_{n}"]) for n in ("benign", "unsure", "malignant")] for r in pooled_rows])
        pooled = json.load(open(tmp_path / model / "metrics.json"))
        present = [k for k, name in enumerate(("benign", "unsure", "malignant")) if 0 < (labels == k).sum() < len(labels)]
        assert len(present) >= 2
        for k in present:
            name = ("benign", "unsure", "malignant")[k]
            assert pooled[f"auc_{name}"] == pytest.approx(roc_auc_score(labels == k, probs[:, k]), abs=1e-6)
            assert pooled["ci95"][f"auc_{name}"][0] <= pooled[f"auc_{name}"] <= pooled["ci95"][f"auc_{name}"][1]
    assert len(read_csv(tmp_path / "cv_folds.csv")) == 2 * cv.NUM_FOLDS
    comparison = json.load(open(tmp_path / "comparison" / "comparison.json"))
    assert [(p["a"], p["b"]) for p in comparison["pairs"]] == [("radiomics_logreg", "radiomics_mlp")]
    assert comparison["nodules"] == len(pooled_rows)
    assert os.path.exists(tmp_path / "comparison" / "roc_overlay.png")
    assert "Out-of-fold" in open(tmp_path / "cv_summary.md").read()


def test_repeated_cross_validation_deals_patients_into_new_folds(lidc_data):
    import tfds_lidc.splits
    assert pipeline.CV_FOLDS == tfds_lidc.splits.NUM_FOLDS
    config = train_config(lidc_data)

    def validation_patients(repeat: int) -> list[set]:
        config.data.cv_repeat = repeat
        out = []
        for k in range(pipeline.CV_FOLDS):
            config.data.cv_fold = k
            train = set(pipeline.records(config.data, "train").patients)
            held_out = set(pipeline.records(config.data, "validation").patients)
            assert not train & held_out
            out.append(held_out)
        return out

    stored, dealt, again = validation_patients(0), validation_patients(1), validation_patients(1)
    everyone = set().union(*stored)
    assert set().union(*dealt) == everyone and sum(map(len, dealt)) == len(everyone)  # a partition of the patients
    assert dealt == again and dealt != stored
    patients = np.array(sorted(everyone) * 2)  # two nodules each: a patient's nodules share their fold
    folds = pipeline.cv_folds(patients, np.zeros(len(patients), int), repeat=3)
    assert (folds[:len(everyone)] == folds[len(everyone):]).all()
    assert np.ptp(np.bincount(folds[:len(everyone)], minlength=pipeline.CV_FOLDS)) <= 1


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
    config = tiny_config(str(tmp_path), batch_size=2, image_size=8)
    recs = pipeline.Records(views=np.zeros((4, 8, 8, 3), np.int16), radiomics=np.zeros((4, 1), np.float32),
                            labels=np.zeros(4, np.int32))
    stats = pipeline.RadiomicsStats.fit(recs.radiomics)
    data_iter = iter(pipeline.train_loader(config.data, recs, stats, seed=0))
    manager = checkpointing.make_manager(str(tmp_path), keep=2)
    aucs = {1: 0.6, 2: 0.9, 3: None, 4: 0.7, 5: None}
    for step, auc in aucs.items():
        state = {"w": np.full((2,), step, np.float32)}
        checkpointing.save(manager, step, state, data_iter, stats.to_json(), config, ModelSpec(None, None, ("a",), ("f",)),
                           metrics=None if auc is None else {"auc_macro": auc})
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 4, 5]  # the latest two and the best
    assert checkpointing.best_step(manager) == 2
    manager.close()


def test_load_model_predicts_what_evaluation_saw(trained):
    config, workdir, result = trained
    model, saved_config, _, stats, step = experiment.load_model(workdir)
    assert step == result["best_step"] and saved_config.model.name == config.model.name
    examples = read_split(config.data.data_dir, "test")
    inputs = [pipeline.example_to_inputs(ex, saved_config.data, stats) for ex in examples]
    images = preprocess.images(np.stack([i["view"] for i in inputs]), preprocess.Preprocessing.from_config(
        saved_config.data))
    logits, _ = forward(model, images, np.stack([i["radiomics"] for i in inputs]))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    saved = json.load(open(os.path.join(workdir, "reports", f"test_step{step}", "metrics.json")))
    assert saved["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == [i["label"] for i in inputs]))


def test_eval_whose_saved_dataset_has_moved_says_to_give_data_dir(trained, tmp_path):
    workdir = copy_run(trained, tmp_path)
    moved = str(tmp_path / "moved_away")
    for path in glob.glob(os.path.join(workdir, "checkpoints", "*", "config", "metadata")):
        with open(path) as f:
            saved = json.load(f)
        saved["data"]["data_dir"] = moved
        with open(path, "w") as f:
            json.dump(saved, f)
    with pytest.raises(pipeline.DatasetError, match=rf"not found in {re.escape(moved)} .* \({re.escape(moved)} is "
                                                    rf"where the training of {re.escape(workdir)} read its dataset.*"
                                                    rf"--data_dir"):
        trainer.evaluate(trained[0], workdir)


# ------------------------------------------------------------------------------------------------------------------
# One writer per workdir
# ------------------------------------------------------------------------------------------------------------------

def copy_run(trained, tmp_path) -> str:
    """A copy of the trained workdir (its checkpoints and metrics log), without its reports."""
    workdir = tmp_path / "workdir"
    shutil.copytree(trained[1], workdir, ignore=shutil.ignore_patterns("reports", "tensorboard", "*.png"))
    return str(workdir)


def test_refused_start_leaves_no_folder_it_made(tmp_path):
    config = autorad_lung.get_config("tiny")
    config.data.data_dir = str(tmp_path / "no_dataset_here")
    (tmp_path / "runs").mkdir()
    with pytest.raises(pipeline.DatasetError, match="no_dataset_here"):
        trainer.train_and_evaluate(config, str(tmp_path / "runs" / "new" / "run1"))
    assert sorted(os.walk(tmp_path)) == [(str(tmp_path), ["runs"], []), (str(tmp_path / "runs"), [], [])]


def test_second_train_on_a_locked_workdir_is_refused_naming_the_holder(trained, tmp_path):
    config = trained[0]
    workdir = copy_run(trained, tmp_path)
    holder = subprocess.Popen(["sleep", "120"])  # a live process of this host, standing for a running train
    try:
        with open(os.path.join(workdir, workdir_lock.LOCK_NAME), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": holder.pid, "started": "2026-01-02 03:04:05 UTC"}, f)
        before = snapshot(tmp_path)
        proc = cli("train", f"--workdir={workdir}", f"--data_dir={config.data.data_dir}", cwd=tmp_path)
        assert_one_line_error(proc, f"{workdir} is in use by another training run (host {socket.gethostname()}, "
                                    f"pid {holder.pid}, started 2026-01-02 03:04:05 UTC")
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    with workdir_lock.hold(workdir):  # the holder is dead now: its lock is stale, and taken over
        with open(os.path.join(workdir, workdir_lock.LOCK_NAME)) as f:
            assert json.load(f)["pid"] == os.getpid()
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))


def test_lock_of_another_host_is_refused(trained, tmp_path):
    workdir = str(tmp_path)
    with open(os.path.join(workdir, workdir_lock.LOCK_NAME), "w") as f:
        json.dump({"host": "elsewhere.invalid", "pid": 1, "started": "yesterday"}, f)
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=r"host elsewhere\.invalid, pid 1, started yesterday.*if no run is going on"):
        trainer.train_and_evaluate(trained[0], workdir)
    assert os.listdir(workdir) == [workdir_lock.LOCK_NAME]


def test_refused_input_leaves_no_workdir_it_made_and_keeps_one_it_found(tmp_path):
    config = train_config(str(tmp_path / "no_dataset_here"))
    made = tmp_path / "first"
    with pytest.raises(pipeline.DatasetError, match="no_dataset_here"):
        trainer.train_and_evaluate(config, str(made))
    assert not made.exists()
    found = tmp_path / "existing"
    found.mkdir()
    with pytest.raises(pipeline.DatasetError):
        trainer.train_and_evaluate(config, str(found))
    assert found.is_dir() and os.listdir(found) == []


def test_diverged_run_continues_as_its_message_says_logging_each_step_once(trained, tmp_path):
    config, original, _ = trained
    workdir = copy_run(trained, tmp_path)
    diverging = config.copy_and_resolve_references()
    diverging.optim.learning_rate = float("inf")
    diverging.train.update(num_steps=8, eval_every=8, checkpoint_every=8)
    # Step 7's update makes the parameters infinite (its own loss, logged, is finite); step 8's loss is NaN.
    with pytest.raises(trainer.NonFiniteLossError, match=r"step 8: .*last good checkpoint \(step 6\)") as e:
        trainer.train_and_evaluate(diverging, workdir)
    key, value = re.search(r"rerun the same command with --config\.(\S+)=(\S+) ", str(e.value)).groups()
    assert key == "optim.learning_rate"
    diverging.optim.learning_rate = float(value)
    result = trainer.train_and_evaluate(diverging, workdir)
    assert result["step"] == 8 and len(result["train_loss"]) == 2 and np.all(np.isfinite(result["train_loss"]))
    with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
        lines = f.read().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))
    assert lines[:6] == open(os.path.join(original, "train_metrics.jsonl")).read().splitlines()
    command = cli_lib.rerun_command(["run.py", "train", "--config.optim.learning_rate", "inf", "--workdir=w"],
                                    e.value.overrides)
    assert command == f"python run.py train --workdir=w --config.optim.learning_rate={value}"
