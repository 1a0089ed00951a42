"""Damaged state a shared cluster leaves: a checkpoint with a truncated data file or an emptied metadata file (eval,
predict, export and resume step over it; an explicit --checkpoint of it is refused), two prepare runs into one
data_dir, the leftovers of a killed build, and a damaged series-cache entry."""

import glob
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import tfds_lidc
from autorad_jax import export
from autorad_jax.ct_input import read_ct
from autorad_jax.predict import predict
from autorad_jax.train import checkpointing, experiment, trainer
from autorad_jax.weights.export_format import EXPORT_CONFIG
from fault_checks import ROOT, cli, cli_exit, environment
from lidc_testdata import CONFIG, read_all
from test_train import losses, train_config

VERSION = str(tfds_lidc.Builder.VERSION)

DAMAGED, INTACT = 4, 2  # the run's checkpoints: the latest is damaged, the earlier one is the fallback
LOCK_NAME = "prepare.lock"  # a prepare's lock, in <data_dir>/lidc_idri/<config>/


def truncate_data_file(step_dir: str) -> str:
    """Cuts the largest array data file of the step's state in half, as a full disk or a partial copy leaves it."""
    path = max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")), key=os.path.getsize)
    os.truncate(path, os.path.getsize(path) // 2)
    return path


def empty_metadata_file(step_dir: str) -> str:
    path = os.path.join(step_dir, "state", "_METADATA")
    os.truncate(path, 0)
    return path


DAMAGES = {"truncated_data_file": truncate_data_file, "emptied_metadata_file": empty_metadata_file}


@pytest.fixture(scope="module")
def run(lidc_data, tmp_path_factory):
    """A 4-step run of the tiny config with checkpoints at steps 2 and 4 (evaluated at 4): (config, workdir)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = train_config(lidc_data, num_steps=DAMAGED)
    trainer.train_and_evaluate(config, workdir)
    return config, workdir


@pytest.fixture(scope="module")
def intact_metrics(run) -> dict:
    """Test metrics of the run's intact checkpoint, asked for by its step."""
    return trainer.evaluate(run[0], run[1], step=INTACT)


def damaged_copy(run, tmp_path, damage: str) -> tuple[str, str]:
    """(a copy of the run's workdir with its latest checkpoint damaged, the damaged file)."""
    workdir = str(tmp_path / "workdir")
    shutil.copytree(run[1], workdir, ignore=shutil.ignore_patterns("reports", "tensorboard", "*.png"))
    return workdir, DAMAGES[damage](os.path.join(checkpointing.checkpoint_dir(workdir), str(DAMAGED)))


def damage_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]


def saved_model_arrays(workdir: str, step: int) -> list[np.ndarray]:
    """The model's arrays of a checkpoint, read back by orbax without any target."""
    tree = ocp.StandardCheckpointer().restore(os.path.join(checkpointing.checkpoint_dir(workdir), str(step), "state"))
    return [np.asarray(x) for x in jax.tree.leaves(tree["0"])]


def ct_and_centre(lidc_data: str) -> tuple[str, list[str]]:
    """A generated series folder and its volume's centre (x,y,z mm), for a sphere nodule."""
    series_dir = sorted(glob.glob(os.path.join(os.path.dirname(lidc_data), "scans", "*", "*", "*")))[0]
    image, _ = read_ct(series_dir)
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    return series_dir, [f"{c:.2f}" for c in centre]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_checkpoint_is_named_and_stepped_over(run, intact_metrics, lidc_data, tmp_path, monkeypatch,
                                                              caplog, damage):
    config, original = run
    workdir, damaged_file = damaged_copy(run, tmp_path, damage)
    named = f"Checkpoint step {DAMAGED} is damaged: {damaged_file} is "

    # An explicit --checkpoint of the damaged step: refused in one line naming the step, the file and the way out.
    message = cli_exit(monkeypatch, "eval", f"--workdir={workdir}", f"--checkpoint={DAMAGED}")
    assert message.split(" ", 1)[1].startswith(f"eval: DamagedCheckpointError: {named}"), message
    assert "\n" not in message
    assert f"intact steps: {INTACT}" in message

    # eval, predict and export use the intact step, each with one line naming the damaged one.
    caplog.set_level(logging.WARNING)
    metrics = trainer.evaluate(config, workdir)
    assert metrics["accuracy"] == intact_metrics["accuracy"] and metrics["brier"] == intact_metrics["brier"]
    assert os.path.isdir(os.path.join(workdir, "reports", f"test_step{INTACT}"))
    series_dir, centre = ct_and_centre(lidc_data)
    result = predict(ct=series_dir, center=centre, diameter=8.0, workdir=workdir)
    assert result["model"]["step"] == INTACT
    out = export.export(workdir, str(tmp_path / "export"))
    with open(os.path.join(out, EXPORT_CONFIG)) as f:
        assert json.load(f)["checkpoint"]["step"] == INTACT
    warnings = damage_warnings(caplog)
    assert len(warnings) == 3 and all(w.startswith(named) and w.endswith(f"using step {INTACT}, the best intact one.")
                                      for w in warnings), warnings

    # Resume: the damaged step is moved aside (not deleted), and the run goes on from the intact one as it went then.
    caplog.clear()
    before = sorted(os.listdir(os.path.join(checkpointing.checkpoint_dir(workdir), str(DAMAGED))))
    result = trainer.train_and_evaluate(config, workdir)
    moved = os.path.join(workdir, checkpointing.DAMAGED_DIR, str(DAMAGED))
    assert sorted(os.listdir(moved)) == before
    [warning] = damage_warnings(caplog)
    assert warning.startswith(named) and warning.endswith(
        f"moved to {moved}, training resumes from step {INTACT}, the newest intact one.")
    assert result["step"] == DAMAGED and len(result["train_loss"]) == DAMAGED - INTACT
    assert losses(workdir) == losses(original)  # steps 3 and 4 again, the same losses
    resumed, uninterrupted = saved_model_arrays(workdir, DAMAGED), saved_model_arrays(original, DAMAGED)
    assert all(np.array_equal(a, b) for a, b in zip(resumed, uninterrupted, strict=True))


def test_restored_model_is_the_intact_steps_and_without_intact_steps_nothing_moves(run, tmp_path, caplog):
    workdir, damaged_file = damaged_copy(run, tmp_path, "truncated_data_file")
    restored = experiment.load_model(workdir)
    assert restored.step == INTACT
    leaves = [np.asarray(x) for x in jax.tree.leaves(nnx.state(restored.model))]
    assert all(np.array_equal(a, b) for a, b in zip(leaves, saved_model_arrays(run[1], INTACT), strict=True))

    empty_metadata_file(os.path.join(checkpointing.checkpoint_dir(workdir), str(INTACT)))
    with pytest.raises(checkpointing.DamagedCheckpointError,
                       match=rf"No intact checkpoint in .*step {INTACT}: .*_METADATA is not valid JSON \(empty\); "
                             rf"step {DAMAGED}: {re.escape(damaged_file)} is truncated"):
        experiment.load_model(workdir)
    before = sorted(os.listdir(checkpointing.checkpoint_dir(workdir)))
    with pytest.raises(checkpointing.DamagedCheckpointError, match="No intact checkpoint"):
        trainer.train_and_evaluate(run[0], workdir)
    assert sorted(os.listdir(checkpointing.checkpoint_dir(workdir))) == before
    assert not os.path.exists(os.path.join(workdir, checkpointing.DAMAGED_DIR))


def _data_bytes(state_dir: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(state_dir, "ocdbt.process_*", "d", "*")))


def test_checkpoints_are_stored_uncompressed_and_compressed_ones_still_restore(run, tmp_path):
    """A step's arrays are stored whole (zstd off: a large model's restore is what predict waits on); a step written
    compressed, as orbax does by default and earlier versions did, restores the same model."""
    workdir = str(tmp_path / "workdir")
    shutil.copytree(run[1], workdir, ignore=shutil.ignore_patterns("reports", "tensorboard", "*.png"))
    state_dir = os.path.join(checkpointing.checkpoint_dir(workdir), str(INTACT), "state")
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(state_dir)
        stored = _data_bytes(state_dir)
        assert stored >= sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))
        shutil.rmtree(state_dir)
        checkpointer.save(state_dir, tree)
    assert _data_bytes(state_dir) < stored
    leaves = [np.asarray(x) for x in jax.tree.leaves(nnx.state(experiment.load_model(workdir, INTACT).model))]
    assert all(np.array_equal(a, b) for a, b in zip(leaves, saved_model_arrays(run[1], INTACT), strict=True))


def test_each_kind_of_damaged_file_is_named(run, tmp_path, caplog):
    """Other files a partial copy or a full disk damages: each is named, and the intact step loads."""
    def emptied(*parts):
        return lambda step_dir: os.truncate(os.path.join(step_dir, *parts), 0)

    def removed_data_file(step_dir):
        os.remove(max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")), key=os.path.getsize))

    cases = {"config/metadata": (emptied("config", "metadata"), "is not valid JSON (empty)"),
             "metrics/metrics": (emptied("metrics", "metrics"), "is not valid JSON (empty)"),  # orbax reads it on open
             "_CHECKPOINT_METADATA": (emptied("_CHECKPOINT_METADATA"), "is not valid JSON (empty)"),
             "state/manifest.ocdbt": (emptied("state", "manifest.ocdbt"), "cannot be read ("),
             "state/ocdbt.process_0/d/": (removed_data_file, "is missing")}
    caplog.set_level(logging.WARNING)
    for name, (damage, problem) in cases.items():
        workdir = str(tmp_path / name.replace("/", "_"))
        shutil.copytree(run[1], workdir, ignore=shutil.ignore_patterns("reports", "tensorboard", "*.png"))
        step_dir = os.path.join(checkpointing.checkpoint_dir(workdir), str(DAMAGED))
        damage(step_dir)
        caplog.clear()
        assert experiment.load_model(workdir).step == INTACT
        [warning] = damage_warnings(caplog)
        assert warning.startswith(f"Checkpoint step {DAMAGED} is damaged: {os.path.join(step_dir, name)}"), warning
        assert problem in warning


def test_command_line_names_a_damaged_checkpoint_in_one_line_without_asyncio_noise(run, lidc_data, tmp_path):
    workdir, damaged_file = damaged_copy(run, tmp_path, "truncated_data_file")
    series_dir, centre = ct_and_centre(lidc_data)
    proc = cli("predict", f"--workdir={workdir}", f"--ct={series_dir}", f"--center={','.join(centre)}",
               "--diameter=8", cwd=tmp_path, env=environment(1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["model"]["step"] == INTACT
    [line] = [line for line in proc.stderr.splitlines() if "damaged" in line]
    assert re.search(rf"\] Checkpoint step {DAMAGED} is damaged: {re.escape(damaged_file)} is truncated \("
                     rf"{os.path.getsize(damaged_file)} bytes; the checkpoint's index refers to bytes up to \d+\); "
                     rf"using step {INTACT}, the best intact one\.$", line), line
    for noise in ("Traceback", "asyncio", "Event loop", "ERROR"):
        assert noise not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------------------------------
# Builds that share a data_dir
# ------------------------------------------------------------------------------------------------------------------

def test_concurrent_prepares_end_with_one_dataset_and_one_line(lidc_data, tmp_path, monkeypatch):
    scans, data_dir = os.path.join(os.path.dirname(lidc_data), "scans"), str(tmp_path / "data")
    lock = os.path.join(data_dir, "lidc_idri", CONFIG, LOCK_NAME)
    first = subprocess.Popen(
        [sys.executable, "-c", f"import tfds_lidc; tfds_lidc.prepare({scans!r}, {data_dir!r}, {CONFIG!r})"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not os.path.exists(lock) and first.poll() is None:
            time.sleep(0.01)
        assert first.poll() is None, first.communicate()
        message = cli_exit(monkeypatch, "prepare", f"--manual_dir={scans}", f"--data_dir={data_dir}",
                           f"--builder_config={CONFIG}")
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert message.split(" ", 1)[1].startswith(f"prepare: DatasetLockedError: lidc_idri/{CONFIG} in {data_dir} is "
                                               f"being built by another prepare (host "), message
    assert f"pid {first.pid}, " in message
    assert "\n" not in message and message.endswith("or use another --data_dir.")
    assert not os.path.exists(lock)
    built, reference = read_all(data_dir), read_all(lidc_data)
    assert built.keys() == reference.keys()
    for key, ex in reference.items():
        np.testing.assert_array_equal(built[key]["ct"], ex["ct"])


def copy_dataset(lidc_data: str, tmp_path) -> tuple[str, str]:
    """(a copy of the built data_dir, its series cache folder)."""
    data_dir = str(tmp_path / "data")
    shutil.copytree(lidc_data, data_dir)
    return data_dir, os.path.join(data_dir, "downloads", "lidc_idri", CONFIG)


def test_leftovers_of_a_killed_build_are_removed_and_named(lidc_data, tmp_path, capsys):
    data_dir, cache = copy_dataset(lidc_data, tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    config_dir = os.path.join(data_dir, "lidc_idri", CONFIG)
    with open(os.path.join(config_dir, LOCK_NAME), "w") as f:  # the killed build's lock
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}, f)
    leftovers = [os.path.join(config_dir, f"incomplete.Q7W2ZK_{VERSION}"), os.path.join(cache, f"{'0' * 32}.npz.tmp4242")]
    os.makedirs(os.path.join(leftovers[0], "part"))
    open(leftovers[1], "w").close()
    others = [os.path.join(data_dir, "lidc_idri", "crop64_1mm", f"incomplete.Q7W2ZK_{VERSION}"),  # another config's
              os.path.join(config_dir, "incomplete.notours")]
    for path in others:
        os.makedirs(path)
    tfds_lidc.prepare(os.path.join(os.path.dirname(lidc_data), "scans"), data_dir, CONFIG)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"Removed what an interrupted build of lidc_idri/{CONFIG} left: {', '.join(leftovers)}"
    assert "was built from the same series; reused" in printed[1]
    assert not any(os.path.exists(p) for p in leftovers) and all(os.path.isdir(p) for p in others)
    assert sorted(os.listdir(config_dir)) == [VERSION, "incomplete.notours"]  # the stale lock taken over, released


def test_damaged_series_cache_entries_are_discarded_rebuilt_and_named(lidc_data, tmp_path):
    data_dir, cache = copy_dataset(lidc_data, tmp_path)
    with open(os.path.join(lidc_data, "lidc_idri", CONFIG, VERSION, "build_report.json")) as f:
        series = [s for s in json.load(f)["series"] if s["nodules_written"]]
    truncated, emptied = (os.path.join(cache, f"{s['cache_key']}.{ext}") for s, ext in zip(series, ("npz", "json")))
    os.truncate(truncated, os.path.getsize(truncated) // 2)
    os.truncate(emptied, 0)
    tfds_lidc.prepare(os.path.join(os.path.dirname(lidc_data), "scans"), data_dir, CONFIG, overwrite=True)
    with open(os.path.join(data_dir, "lidc_idri", CONFIG, VERSION, "build_report.json")) as f:
        rep = json.load(f)
    assert rep["series_read"] - rep["series_from_cache"] == 2
    notes = {i["series_dir"]: i["issue"] for i in rep["issues"] if "damaged series cache entry" in i["issue"]}
    assert notes == {
        series[0]["series_dir"]: f"damaged series cache entry discarded and the series read again: {truncated} "
                                 f"cannot be read (BadZipFile: File is not a zip file)",
        series[1]["series_dir"]: f"damaged series cache entry discarded and the series read again: {emptied} is not "
                                 f"valid JSON (Expecting value: line 1 column 1 (char 0))"}
    rebuilt, reference = read_all(data_dir), read_all(lidc_data)
    assert rebuilt.keys() == reference.keys()
    for key, ex in reference.items():
        for name in ("ct", "mask", "radiomics", "ratings", "label", "split", "fold"):
            np.testing.assert_array_equal(rebuilt[key][name], ex[name])
