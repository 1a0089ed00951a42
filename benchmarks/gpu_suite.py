r"""The GPU benchmark suite in one call: the AIMv2 port and attention checks, then train and eval steps of JAX against
PyTorch eager and torch.compile, into one JSON file and one Markdown table, within a time budget.

On a fresh machine whose image has jax (CUDA), flax, optax, orbax, transformers and torch but not the project's other
packages, the wheels carried in --wheels are installed first (into --site, then this script starts again with it on
PYTHONPATH). Each job runs in a fresh process, in order of importance; a job that the remaining budget cannot hold is
listed as not run, never estimated. `--dry-run` runs the same jobs on the CPU with the tiny config and minimal sizes
(the test suite does so, so that this script cannot rot).

  python benchmarks/gpu_suite.py --out results/ --wheels .whl             # one H200, about 8 minutes
  python benchmarks/gpu_suite.py --out /tmp/suite --dry-run               # CPU, tiny config
  python benchmarks/gpu_suite.py --download_wheels .whl                   # here: fetch the wheels to carry
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time

import machine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Modules the benchmarks import that the GPU image lacks, and the pinned distributions that provide them.
NEEDED_MODULES = ("grain", "array_record", "ml_collections", "tensorflow_datasets", "radiomics", "SimpleITK",
                  "pydicom")
CARRIED = ("grain", "array_record", "ml_collections", "tensorflow-datasets", "tensorflow-metadata", "promise",
           "dm-tree", "immutabledict", "simple-parsing", "docstring_parser", "toml", "termcolor", "pyradiomics-bhklab",
           "simpleitk", "pydicom", "pykwalify", "docopt", "ruamel.yaml", "PyWavelets", "portpicker")


def jobs(dry_run: bool) -> list[tuple[str, list[str]]]:
    """(name, command) per job, most important first: the checks, then the train steps at batch 128 with the JAX
    blocks scanned and unrolled (config.model.scan_layers' default is decided by these) and the eval step, then the
    other batch sizes."""
    python = [sys.executable]
    if dry_run:
        config, gpu_flags = "configs/autorad_lung.py:tiny", []
        train_sizes, eval_sizes, variants, rounds, batch = ["4"], ["4"], "eager", "1", "4"
        modes = ["full,prompt"]  # one process
    else:
        config = "configs/autorad_lung.py:large"
        gpu_flags = ["--config.model.dtype=bfloat16", "--config.model.attention_implementation=cudnn"]
        train_sizes, eval_sizes, variants, rounds, batch = ["128", "64", "256"], ["256", "128"], "eager,compile", "5", "32"
        modes = ["full", "prompt"]
    out = [("checks", [*python, "benchmarks/gpu_checks.py", "--config", config, "--batch", batch])]
    for i, size in enumerate(train_sizes):
        layouts = ["--jax_layouts", "scanned,unrolled"] if i == 0 else []
        for mode in modes:
            out.append((f"train_{mode.replace(',', '_')}_{size}",
                        [*python, "benchmarks/train_throughput.py", "--config", config, *gpu_flags, "--modes", mode,
                         "--batch_sizes", size, "--torch", variants, "--rounds", rounds, "--warmup", "1", *layouts]))
        if i < len(eval_sizes):
            out.append((f"eval_{eval_sizes[i]}", [*python, "benchmarks/eval_throughput.py", "--config", config,
                                                  *gpu_flags, "--batch_sizes", eval_sizes[i], "--torch", variants,
                                                  "--rounds", rounds, "--warmup", "1"]))
    return out


def run_jobs(out_dir: str, dry_run: bool, budget_s: float) -> dict:
    """Runs `jobs` in fresh processes while the budget lasts; returns the suite's result."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # JAX and PyTorch share the device's memory
    deadline = time.monotonic() + budget_s
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": dry_run, "budget_s": budget_s, "checks": None, "rows": [], "not_run": [], "failed": {}}
    for name, command in jobs(dry_run):
        left = deadline - time.monotonic()
        if left < 10:
            result["not_run"].append(name)
            continue
        json_path = os.path.join(out_dir, f"{name}.json")
        start = time.monotonic()
        try:
            proc = subprocess.run([*command, "--json_out", json_path], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=left)
        except subprocess.TimeoutExpired:
            result["not_run"].append(f"{name} (stopped at the budget's end)")
            continue
        print(f"{name}: {time.monotonic() - start:.0f} s, exit {proc.returncode}", flush=True)
        if proc.returncode != 0:
            result["failed"][name] = proc.stderr[-2000:]
            continue
        with open(json_path) as f:
            data = json.load(f)
        if name == "checks":
            result["checks"] = data
        else:
            result["rows"] += data
    result["load_average"] = machine.load_average()
    return result


def markdown(result: dict) -> str:
    """The suite's result as Markdown: the checks, then one row per implementation, mode and batch."""
    lines = [f"GPU suite, {result['date']}{' (dry run: CPU, tiny config)' if result['dry_run'] else ''}", ""]
    checks = result["checks"]
    if checks:
        lines.append(f"Port vs transformers on {checks['device']}, relative error: float32 {checks['float32']}, "
                     f"bfloat16 (JAX) {checks['bfloat16_jax']}, bfloat16 (torch autocast) "
                     f"{checks['bfloat16_torch_autocast']}; cuDNN attention: {checks['cudnn_attention']}")
        lines.append("")
    lines += ["| impl | mode | batch | step ms | compile s | images/s | MFU | peak mem GiB | JAX speed-up |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        memory = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        lines.append(f"| {r['impl']} | {r['mode']} | {r['batch']} | {r['step_ms']:.1f} | {r['compile_s']:.0f} | "
                     f"{r['images_per_s']:.1f} | {mfu} | {memory} | {r['jax_speedup'][0]:.2f}x |")
    lines += ["", f"Not run (budget): {', '.join(result['not_run']) or 'none'}; failed: "
              f"{', '.join(result['failed']) or 'none'}; load average {result['load_average']}"]
    return "\n".join(lines) + "\n"


def install_wheels(wheels: str, site: str) -> None:
    """Installs the carried wheels into `site` and starts this script again with `site` on PYTHONPATH, unless every
    needed module imports already."""
    missing = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
    if not missing or os.environ.get("AUTORAD_SUITE_INSTALLED"):
        return
    print(f"installing {len(glob.glob(os.path.join(wheels, '*.whl')))} carried wheels for {', '.join(missing)}",
          flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", site, *glob.glob(os.path.join(wheels, "*.whl"))],
                   check=True)
    env = dict(os.environ, AUTORAD_SUITE_INSTALLED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def download_wheels(folder: str) -> None:
    """Fetches (here, where pip reaches PyPI) the CARRIED distributions at requirements.txt's pins, as wheels for
    the GPU image's Python 3.12 on x86-64."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pins = dict(line.split("#")[0].strip().split("==") for line in f if "==" in line.split("#")[0])
    lowered = {k.lower(): f"{k}=={v}" for k, v in pins.items()}
    platforms = [a for tag in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1")
                 for a in ("--platform", f"{tag}_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", folder,
                    *(lowered[name.lower()] for name in CARRIED)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for suite.json, suite.md and each job's JSON")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny config, minimal sizes")
    parser.add_argument("--budget_s", type=float, default=None, help="seconds for the jobs (default 450; dry run 540)")
    parser.add_argument("--wheels", default=None, help="folder of carried wheels to install where modules are missing")
    parser.add_argument("--site", default="/tmp/site", help="where the carried wheels are installed")
    parser.add_argument("--download_wheels", default=None, help="fetch the wheels to carry into this folder, and stop")
    args = parser.parse_args()
    if args.download_wheels:
        download_wheels(args.download_wheels)
        return
    if args.wheels:
        install_wheels(args.wheels, args.site)
    os.makedirs(args.out, exist_ok=True)
    budget = args.budget_s or (540.0 if args.dry_run else 450.0)
    result = run_jobs(args.out, args.dry_run, budget)
    with open(os.path.join(args.out, "suite.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = markdown(result)
    with open(os.path.join(args.out, "suite.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
