"""The workdir's compilation cache: a resumed run loads its compiled train step instead of compiling it again, and a
prediction its forward pass."""

import os
import shutil

import jax

from autorad_jax.train import checkpointing, compilation_cache, trainer
from fault_checks import cli, environment
from test_damaged_state import ct_and_centre
from test_train import train_config


def test_a_cache_set_in_the_environment_is_kept(tmp_path):
    assert os.environ["JAX_COMPILATION_CACHE_DIR"]  # conftest's session cache
    assert compilation_cache.use_workdir_cache(True, str(tmp_path)) == os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert jax.config.jax_compilation_cache_dir == os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert os.listdir(tmp_path) == []


def test_resumed_run_reads_the_train_step_from_the_workdir_cache(lidc_data, tmp_path):
    env = {k: v for k, v in environment(1).items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # every program, however fast it compiled
    workdir = tmp_path / "run"
    cache = workdir / compilation_cache.FOLDER

    def train() -> set[str]:
        proc = cli("train", f"--workdir={workdir}", f"--data_dir={os.path.relpath(lidc_data, tmp_path)}",
                   "--config.train.num_steps=2", "--config.train.checkpoint_every=1", "--config.data.batch_size=8",
                   cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        return {name for name in os.listdir(cache) if name.startswith(("jit_train_step", "jit_eval_step"))}

    first = train()
    assert {name.split("-")[0] for name in first} == {"jit_train_step", "jit_eval_step"}
    last = os.path.join(checkpointing.checkpoint_dir(str(workdir)), "2")
    shutil.rmtree(last)  # as if preempted after step 1
    assert train() == first  # the resumed run's steps had the same cache keys: loaded, not compiled and added
    assert os.path.isdir(last)  # it did run step 2
    with checkpointing.open_manager(str(workdir), read_only=True) as manager:
        saved_config, _, _ = checkpointing.restore_meta(manager, 2)
    assert saved_config["data"]["data_dir"] == lidc_data  # given relative to the run's directory, saved absolute


def test_a_prediction_reads_its_forward_pass_from_the_workdir_cache(lidc_data, tmp_path):
    """However fast the forward pass compiles (JAX's default keeps only programs over a second)."""
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(train_config(lidc_data, num_steps=2), str(workdir))  # into the session's cache
    env = {k: v for k, v in environment(1).items() if k not in ("JAX_COMPILATION_CACHE_DIR",
                                                                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    series_dir, centre = ct_and_centre(lidc_data)

    def predict() -> set[str]:
        proc = cli("predict", f"--workdir={workdir}", f"--ct={series_dir}", f"--center={','.join(centre)}",
                   "--diameter=8", "--json", cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        return set(os.listdir(workdir / compilation_cache.FOLDER))

    first = predict()
    assert any(name.startswith("jit_probabilities") for name in first), first
    assert predict() == first  # read back, not compiled and added again
