"""The command line: help text, subcommands and config overrides."""

import os
import subprocess
import sys

import pytest

from fault_checks import ROOT, cli_exit

sys.path.insert(0, os.path.join(ROOT, "configs"))

import autorad_lung  # noqa: E402
import run  # noqa: E402


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_help_lists_every_subcommand_with_a_description():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for command in run.SUBCOMMANDS:
        described = [line for line in lines if line.split()[:1] == [command] and len(line.split()) > 3]
        assert described, f"{command} is not described in --help"


def test_misspelt_config_key_fails_naming_the_key():
    result = _run("train", "--config", "configs/autorad_lung.py:tiny", "--config.no_such_key=1")
    assert result.returncode != 0
    assert "no_such_key" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_subcommand_fails():
    result = _run("fly")
    assert result.returncode != 0
    assert "fly" in result.stderr


@pytest.mark.parametrize("variant", ["tiny", "large"])
def test_configs_load_and_lock(variant):
    config = autorad_lung.get_config(variant)
    config.lock()
    with pytest.raises(AttributeError):
        config.optim.no_such_key = 1
    # The pipeline's image size is the vision tower's input size.
    config.data.image_size = 112
    assert config.model.vision.image_size == 112


def test_large_config_matches_aimv2_large_patch14_224():
    vision = autorad_lung.get_config("large").model.vision
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size,
            vision.patch_size, vision.image_size) == (1024, 24, 8, 2816, 14, 224)


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="huge"):
        autorad_lung.get_config("huge")


def test_absl_info_lines_are_off_unless_verbosity_asks_and_bad_input_is_one_line(tmp_path):
    missing = str(tmp_path / "missing.csv")
    quiet = _run("predict", "--nodules", missing, "--export", str(tmp_path))
    assert quiet.returncode != 0
    assert quiet.stderr.strip().splitlines() == [quiet.stderr.strip()]  # one line, no traceback
    assert f"nodule table {missing}" in quiet.stderr and "No such file" in quiet.stderr
    info = _run("predict", "--nodules", missing, "--export", str(tmp_path), "--verbosity=0")
    assert "cli.py" in info.stderr and "] run.py predict" in info.stderr  # absl's INFO line, only when asked


def test_predict_refuses_a_workdir_and_an_export_given_together(tmp_path, monkeypatch):
    from autorad_jax import cli as cli_lib
    ct = tmp_path / "ct.nii.gz"
    refusals = [cli_exit(monkeypatch, "predict", *models, f"--ct={ct}", "--center=0,0,0", "--diameter=8")
                for models in ([f"--workdir={tmp_path}", f"--export={tmp_path}"],
                               [f"--export={tmp_path}"])]  # with the default workdir, which is not meant
    assert refusals == [f"{cli_lib._PROG} predict: PredictInputError: give either a workdir (--workdir) or an export "
                        f"folder (--export), not both.",
                        f"{cli_lib._PROG} predict: PredictInputError: CT {ct} does not exist."]
