"""The core install: every core command runs in a fresh interpreter where torch, Apache Beam and pylidc cannot be
imported (as in `pip install autorad-jax` without extras), and a command that needs an absent extra names it."""

import os
import pathlib
import subprocess
import sys

import pytest

from fault_checks import ROOT, environment

# Installed here, but absent for the subprocesses: a sitecustomize (imported at every interpreter's start, worker
# processes included) wraps the import system's finders so that these modules are not found, exactly as when they are
# not installed (`import torch` raises ModuleNotFoundError, importlib.util.find_spec returns None).
ABSENT = ("torch", "apache_beam", "pylidc")
SITECUSTOMIZE = f"""
import sys

ABSENT = {ABSENT!r}


class _Without:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return self._finder.find_spec(name, path, target) if hasattr(self._finder, "find_spec") else None

    def __getattr__(self, name):
        return getattr(self._finder, name)


sys.meta_path[:] = [_Without(finder) for finder in sys.meta_path]
"""


@pytest.fixture(scope="module")
def core_env(tmp_path_factory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("core_site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**environment(1), "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(site), ROOT])}


def _autorad(*args: str, env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_the_absent_modules_are_absent(core_env, tmp_path):
    code = ("import importlib.util; "
            f"print([importlib.util.find_spec(m) for m in {ABSENT!r}]); "
            "import torch")
    proc = subprocess.run([sys.executable, "-c", code], env=core_env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.stdout.split() == ["[None,", "None,", "None]"]
    assert "ModuleNotFoundError: No module named 'torch'" in proc.stderr


def test_core_commands_run_without_torch_beam_and_pylidc(core_env, lidc_data, tmp_path):
    """prepare (direct runner), train (which evaluates), export and predict with JAX, each in a fresh interpreter; the
    modules of eval, compare and cv import."""
    scans = pathlib.Path(lidc_data).parent / "scans"  # the scans lidc_data was built from (tests/conftest.py)
    manual = tmp_path / "manual"
    manual.mkdir()
    patients = sorted(p for p in scans.iterdir() if p.is_dir())[:2]
    for patient in patients:
        (manual / patient.name).symlink_to(patient)
    built = _ok(_autorad("prepare", f"--manual_dir={manual}", f"--data_dir={tmp_path / 'tfds'}",
                         "--builder_config=crop32_1mm", env=core_env, cwd=tmp_path))
    assert (tmp_path / "tfds" / "lidc_idri" / "crop32_1mm").is_dir(), built.stderr[-2000:]

    workdir = tmp_path / "run"
    _ok(_autorad("train", f"--workdir={workdir}", f"--config.data.data_dir={lidc_data}",
                 "--config.train.num_steps=2", "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
                 "--config.data.batch_size=8", env=core_env, cwd=tmp_path))
    assert (workdir / "metrics.json").is_file()
    _ok(_autorad("export", f"--workdir={workdir}", f"--out={tmp_path / 'export'}", env=core_env, cwd=tmp_path))

    series = next(p.parent for p in sorted((scans / patients[0].name).rglob("*.xml")))
    predicted = _ok(_autorad("predict", f"--workdir={workdir}", f"--ct={series}", f"--xml={next(series.glob('*.xml'))}",
                             "--json", env=core_env, cwd=tmp_path))
    assert '"probabilities"' in predicted.stdout

    # eval and compare run the evaluation and comparison code that train ran above (and tests/test_train.py runs them);
    # here their modules and cv's import without the extras.
    code = "import autorad_jax.train.compare, autorad_jax.train.cv, autorad_jax.train.trainer, autorad_jax.demo"
    _ok(subprocess.run([sys.executable, "-c", code], env=core_env, cwd=tmp_path, capture_output=True, text=True))

    # The exported model in PyTorch is the torch extra's.
    proc = _autorad("predict", f"--export={tmp_path / 'export'}", "--backend=torch", f"--ct={series}",
                    f"--xml={next(series.glob('*.xml'))}", env=core_env, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == _needs("predict", "torch", "torch")


def test_synth_without_the_demo_extra_names_it(core_env, tmp_path):
    proc = _autorad("synth", "--num_scans=1", f"--out={tmp_path / 'scans'}", env=core_env, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == _needs("synth", "demo", "pylidc")
    assert not (tmp_path / "scans").exists()


def test_a_beam_build_without_the_beam_extra_names_it(core_env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tfds_lidc", "build", os.path.join(ROOT, "tfds_lidc", "lidc_idri"),
                           f"--manual_dir={tmp_path}", f"--data_dir={tmp_path / 'tfds'}",
                           "--beam_pipeline_options=runner=DirectRunner"],
                          env=core_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "tfds_lidc build: --beam_pipeline_options needs the 'beam' extra (apache_beam is not installed): "
        "pip install 'autorad-jax[beam]'")


def _needs(command: str, extra: str, module: str) -> str:
    return (f"run.py {command}: needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'autorad-jax[{extra}]'")
