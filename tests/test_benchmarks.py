"""Smoke runs of the benchmark scripts on the CPU with the tiny config (no timing assertions)."""

import glob
import json
import os
import subprocess
import sys

import jax
import pytest

from fault_checks import ROOT, environment
from lidc_testdata import read_split



def _run(script: str, *args: str) -> str:
    env = dict(environment(1), PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_gpu_suite_dry_run_checks_the_port_and_times_jax_and_pytorch(tmp_path):
    """The GPU suite's own jobs on the CPU with the tiny config: the port check against transformers and the train
    (both modes, both block layouts) and eval comparisons, into suite.json and suite.md."""
    _run("gpu_suite.py", "--dry-run", "--out", str(tmp_path))
    result = json.loads((tmp_path / "suite.json").read_text())
    assert result["failed"] == {} and result["not_run"] == []
    assert max(result["checks"]["float32"].values()) <= 1e-5  # JAX port against transformers' Aimv2, float32
    assert result["checks"]["cudnn_attention"].startswith("skipped")
    rows = {(r["impl"], r["mode"]) for r in result["rows"]}
    assert rows == {(impl, mode) for impl in ("jax scanned", "jax unrolled", "torch eager")
                    for mode in ("full", "prompt")} | {("jax", "eval"), ("torch eager", "eval")}
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 and r["compile_s"] >= 0 for r in result["rows"])
    jax_row = next(r for r in result["rows"] if r["impl"] == "jax" and r["mode"] == "eval")
    torch_row = next(r for r in result["rows"] if r["impl"] == "torch eager" and r["mode"] == "eval")
    assert torch_row["jax_speedup"][0] == pytest.approx(torch_row["step_ms"] / jax_row["step_ms"])  # one round
    assert "| torch eager | prompt | 4 |" in (tmp_path / "suite.md").read_text()


def test_pipeline_script_reports_images_per_second(lidc_data, tmp_path):
    rows = [{"impl": "jax", "images_per_s": 1.0}]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    out = _run("pipeline_throughput.py", "--config", "configs/autorad_lung.py:tiny",
               f"--config.data.data_dir={lidc_data}", "--worker_counts", "0", "--batches", "2",
               "--train_json", str(tmp_path / "train.json"))
    line = next(line for line in out.splitlines() if line.startswith("| 0 |"))
    assert float(line.split("|")[2]) > 0
    num_radiomics = len(read_split(lidc_data, "train")[0]["radiomics"])
    # int16 views of 32^3 crops, float32 radiomics, int32 label
    assert float(line.split("|")[3]) == 32 * 32 * 3 * 2 + 4 * num_radiomics + 4


def test_step_gap_script_traces_the_chosen_steps_of_a_training_run(lidc_data, tmp_path):
    out = _run("step_gaps.py", "--config", "configs/autorad_lung.py:tiny", f"--config.data.data_dir={lidc_data}",
               "--config.data.batch_size=8", "--config.data.eval_batch_size=8", "--start", "2", "--steps", "3",
               "--workdir", str(tmp_path))
    traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1
    annotated = [e for plane in jax.profiler.ProfileData.from_file(traces[0]).planes for line in plane.lines
                 for e in line.events if e.name == "train"]
    assert len(annotated) == 3  # steps 2, 3 and 4, one StepTraceAnnotation each
    row = next(line for line in out.splitlines() if line.startswith("| 2-4 |"))
    span, busy = float(row.split("|")[2]), float(row.split("|")[4])
    assert 0 < busy <= span


def test_layout_step_cost_script_times_both_layouts():
    out = _run("layout_step_cost.py", "--config", "configs/autorad_lung.py:tiny", "--config.data.batch_size=8",
               "--modes", "prompt", "--rounds", "2")
    row = next(line for line in out.splitlines() if line.startswith("| prompt | 8 |"))
    scanned, unrolled = float(row.split("|")[3]), float(row.split("|")[4])
    assert scanned > 0 and unrolled > 0


def test_preprocessing_cost_script_times_both_steps():
    out = _run("preprocessing_cost.py", "--config", "configs/autorad_lung.py:tiny", "--config.data.batch_size=8",
               "--modes", "prompt", "--rounds", "2", "--calls", "1")
    row = next(line for line in out.splitlines() if line.startswith("| prompt | 8 |"))
    inside, fed = float(row.split("|")[3]), float(row.split("|")[4])
    assert inside > 0 and fed > 0
