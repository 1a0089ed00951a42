"""The installable package: a wheel built from the checkout, installed without dependencies into a folder outside
it, runs `autorad` and restores configs from the packaged files alone; every module of the checkout imports."""

import glob
import importlib
import os
import pkgutil
import shutil
import subprocess
import sys

import pytest

import autorad_jax
import tfds_lidc
from fault_checks import ROOT


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    source = shutil.copytree(ROOT, tmp_path / "src", ignore=shutil.ignore_patterns(
        ".git", ".venv", "workdir", "__pycache__", "*.egg-info", "build", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel, = glob.glob(str(tmp_path / "dist" / "autorad_jax-*.whl"))
    assert os.path.basename(wheel).startswith(f"autorad_jax-{autorad_jax.__version__}-")  # the version, defined once
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), wheel],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    help_text = subprocess.run([str(site / "bin" / "autorad"), "--help"], capture_output=True, text=True, env=env,
                               cwd=outside, timeout=300)
    assert help_text.returncode == 0, help_text.stderr[-2000:]
    assert "predict" in help_text.stdout and "--workdir" in help_text.stdout
    version = subprocess.run([str(site / "bin" / "autorad"), "--version"], capture_output=True, text=True, env=env,
                             cwd=outside, timeout=300)
    assert version.stdout == f"autorad-jax {autorad_jax.__version__}\n", version.stderr[-2000:]

    code = ("import configs, tfds_lidc.radiomics_features as r, autorad_jax.train.checkpointing as c; "
            "config = c.saved_config({'model': {'name': 'coop', 'n_ctx': 7}}); "
            "print(configs.__file__, r.DEFAULT_PARAMS, config.model.name, config.model.n_ctx, config.data.view)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=outside,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    config_file, params, name, n_ctx, view = out.stdout.split()
    assert config_file.startswith(str(site)) and params.startswith(str(site)) and os.path.isfile(params)
    assert (name, n_ctx, view) == ("coop", "7", "2.5d")


@pytest.mark.parametrize("package", [autorad_jax, tfds_lidc], ids=lambda p: p.__name__)
def test_every_module_imports(package):
    """A name moved from one module to another breaks, at import time, every module that imports it there."""
    names = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
             if not m.name.endswith(".__main__")]
    assert names
    for name in names:
        importlib.import_module(name)


def test_training_starts_without_the_evaluation_libraries():
    """scikit-learn and matplotlib (about 2 s of imports) load at the first evaluation, not before the first step."""
    code = ("import sys, autorad_jax.train.trainer; "
            "print(*sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'matplotlib', 'scipy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["scipy"]  # scipy.special, for the radiomics transform
