r"""Start-up cost of a training run: model init, trace, XLA compile, first step and steady step, per layout.

For each config variant, trainable mode (`full`: vision tower trains; `prompt`: prompt learner only) and layout
(`unrolled` blocks or `scanned` stacked blocks, config.model.scan_layers), in a fresh process each:
  init        the `Experiment.init_state()` of training (random init in the shardings; with --pretrained also the load
              of a folder written here by transformers' `save_pretrained`)
  trace       `jax.jit(train_step).trace(state, batch)`
  compile     `.lower().compile()` of that trace
  first step  the first call of the compiled step; steady: median of the next --steps calls
Init, trace and compile run with Python's cyclic garbage collector paused, as in the trainer (autorad_jax/train/
collector.py).
With --restart each case runs twice with one fresh persistent compilation cache (what `config.train.compilation_cache`
gives a training run in its workdir): a first start, which fills it, and a restart, which reads it.

  python benchmarks/startup.py --variants tiny,large --batch_size 2 --steps 3 [--pretrained] [--restart]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

LAYOUTS = {"unrolled": False, "scanned": True}


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _pretrained_folder(config, path: str) -> None:
    """A random transformers Aimv2Model of config.model's towers, written with save_pretrained."""
    import transformers
    from autorad_jax import modeling
    towers = modeling.random_towers(config.model)
    transformers.Aimv2Model(transformers.Aimv2Config(**towers.to_hf_dict())).save_pretrained(path)


def run_case(variant: str, mode: str, layout: str, batch_size: int, steps: int, pretrained: bool) -> dict:
    """Times one case in this process (which must not have run another)."""
    import jax
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.common import NUM_RADIOMICS, random_batch
    from autorad_jax import modeling
    from autorad_jax.data import pipeline
    from autorad_jax.train import collector, experiment
    from configs import autorad_lung

    config = autorad_lung.get_config(variant)
    config.model.trainable = mode
    config.model.scan_layers = LAYOUTS[layout]
    config.data.batch_size = config.data.eval_batch_size = batch_size
    config.mesh.data = 1
    with tempfile.TemporaryDirectory() as folder:
        if pretrained:
            _pretrained_folder(config, folder)
            config.model.pretrained_dir = folder
        spec = modeling.resolve_spec(config, tuple(f"feature_{i}" for i in range(NUM_RADIOMICS)))
        exp = experiment.make_experiment(config, spec)
        with collector.paused():  # as the trainer does
            state, init = _timed(lambda: jax.block_until_ready(exp.init_state()))
    batch = pipeline.to_global(random_batch(config, len(spec.class_names)), exp.batch_sharding)
    with collector.paused():
        traced, trace = _timed(lambda: exp.train_step.trace(state, batch))
        compiled, compile_s = _timed(lambda: traced.lower().compile())
    (state, _), first = _timed(lambda: jax.block_until_ready(compiled(state, batch)))
    times = []
    for _ in range(steps):
        (state, _), t = _timed(lambda: jax.block_until_ready(compiled(state, batch)))
        times.append(t)
    return {"variant": variant, "mode": mode, "layout": layout, "pretrained": pretrained, "init_s": init,
            "trace_s": trace, "compile_s": compile_s, "first_step_s": first, "steady_step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="tiny,large")
    parser.add_argument("--modes", default="full,prompt")
    parser.add_argument("--layouts", default="unrolled,scanned")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steady steps timed (median reported)")
    parser.add_argument("--pretrained", action="store_true", help="init from a local save_pretrained folder")
    parser.add_argument("--restart", action="store_true", help="each case again, reading the compilation cache")
    parser.add_argument("--json_out", default=None)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # variant,mode,layout: run one, print JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case.split(","), args.batch_size, args.steps, args.pretrained)))
        return
    rows = []
    header = (f"{'variant':8} {'mode':7} {'layout':9} {'start':8} {'init':>7} {'trace':>7} {'compile':>8} "
              f"{'1st step':>9} {'step':>7}")
    print(header, flush=True)
    for variant in args.variants.split(","):
        for mode in args.modes.split(","):
            for layout in args.layouts.split(","):
                cmd = [sys.executable, os.path.abspath(__file__), "--case", f"{variant},{mode},{layout}",
                       "--batch_size", str(args.batch_size), "--steps", str(args.steps)]
                cmd += ["--pretrained"] if args.pretrained else []
                with tempfile.TemporaryDirectory() as cache:
                    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
                    env["JAX_PLATFORMS"] = "cpu"
                    if args.restart:
                        env["JAX_COMPILATION_CACHE_DIR"] = cache
                    for start in ("first", "restart") if args.restart else ("first",):
                        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                        row = {**json.loads(out.stdout.strip().splitlines()[-1]), "start": start}
                        rows.append(row)
                        print(f"{variant:8} {mode:7} {layout:9} {start:8} {row['init_s']:7.1f} {row['trace_s']:7.1f} "
                              f"{row['compile_s']:8.1f} {row['first_step_s']:9.2f} {row['steady_step_s']:7.3f}",
                              flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
