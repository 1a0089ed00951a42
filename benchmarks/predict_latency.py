r"""`run.py predict` of one nodule, end to end (process start to JSON) and split into its parts, per config variant.

Setup (not timed): 3 demo scans built into a dataset at the variant's crop size, a workdir trained for one step from
random-init towers (so the checkpoint has the variant's full size), and one full-size demo CT (every slice at 512²) as
a DICOM series folder; the nodule is a sphere around the first reader-marked nodule of that CT.
Timed, each in a fresh process, cold (the workdir's compilation cache emptied first) and warm (the cache the cold
run filled; predict keeps its compiled forward pass in <workdir>/compilation_cache):
  end to end  `python run.py predict --workdir W --ct CT --center x,y,z --diameter d --json`, wall time;
  parts       imports (autorad_jax.ct_input, autorad_jax.predictor and what they pull in), CT reading (DICOM -> HU
              volume, the slices around the centre as predict reads them), model load (the checkpoint, on one
              device), radiomics (crop and pyradiomics features, the builder's code) and the forward pass
              (preprocessing and model), each timed in that order by one process.

  python benchmarks/predict_latency.py --variants tiny,large
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PARTS = ("imports", "ct_reading", "model_load", "radiomics", "forward")


def _workdir(variant: str, folder: str) -> str:
    """A workdir of `variant` trained for one step on 3 downsampled demo scans."""
    import tfds_lidc
    from autorad_jax.train import trainer
    from configs import autorad_lung
    config = autorad_lung.get_config(variant)
    tfds_lidc.synth.generate(os.path.join(folder, "scans"), 3, seed=0, verbose=False)
    tfds_lidc.prepare(os.path.join(folder, "scans"), os.path.join(folder, "tfds"),
                      builder_config=config.data.builder_config)
    config.data.update(data_dir=os.path.join(folder, "tfds"), batch_size=2, eval_batch_size=2)
    config.train.update(num_steps=1, log_every=1, eval_every=1, checkpoint_every=1)
    config.mesh.data = 1
    workdir = os.path.join(folder, f"workdir_{variant}")
    trainer.train_and_evaluate(config, workdir)
    return workdir


def _nodule(folder: str) -> tuple[str, list[float], float]:
    """(series folder, centre x,y,z mm, diameter mm) of the first nodule of one full-size demo scan."""
    import numpy as np
    import SimpleITK as sitk
    import tfds_lidc
    from autorad_jax import ct_input
    series_dir = tfds_lidc.synth.generate(os.path.join(folder, "ct"), 1, seed=1, full_size=True, verbose=False)[0]
    xml = next(os.path.join(series_dir, f) for f in sorted(os.listdir(series_dir)) if f.endswith(".xml"))
    image, series = ct_input.read_ct(series_dir)
    mask = next(m for m, _ in ct_input.xml_masks(xml, series, 0.5) if m is not None)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    diameter = float(np.clip(stats.GetEquivalentSphericalRadius(1) * 2, *ct_input.DIAMETER_RANGE_MM))
    return series_dir, list(stats.GetCentroid(1)), diameter


def time_parts(workdir: str, ct: str, center: str, diameter: float) -> dict:
    """The parts of one prediction, timed in this (fresh) process in the order predict runs them."""
    marks = [("start", time.perf_counter())]
    from autorad_jax import ct_input, predictor as predictor_lib
    marks.append(("imports", time.perf_counter()))
    image, series = ct_input.read_ct(ct, around=ct_input.sphere_region(center, diameter))  # as predict reads it
    marks.append(("ct_reading", time.perf_counter()))
    predictor = predictor_lib.load_predictor(workdir=workdir)
    marks.append(("model_load", time.perf_counter()))
    (mask, _), = ct_input.nodule_masks(image, series, mask=None, center=center, diameter=diameter, xml=None,
                                      consensus_level=0.5)
    inputs = predictor_lib.nodule_inputs(predictor, image, mask)
    marks.append(("radiomics", time.perf_counter()))
    predictor_lib.score_nodule(predictor, inputs)
    marks.append(("forward", time.perf_counter()))
    return {name: t - prev for (_, prev), (name, t) in zip(marks, marks[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="tiny,large")
    parser.add_argument("--json_out", default=None)
    parser.add_argument("--parts", nargs=4, default=None, help=argparse.SUPPRESS)  # workdir ct center diameter
    args = parser.parse_args()
    if args.parts:
        print(json.dumps(time_parts(args.parts[0], args.parts[1], args.parts[2], float(args.parts[3]))))
        return
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the workdir's cache, as a user's
    env["JAX_PLATFORMS"] = "cpu"
    rows = []
    print(f"{'variant':8} {'cache':5} {'end to end':>10} " + " ".join(f"{p:>10}" for p in PARTS) + "   (seconds)",
          flush=True)
    with tempfile.TemporaryDirectory() as folder:
        ct, center, diameter = _nodule(folder)
        center_arg = ",".join(f"{v:.2f}" for v in center)
        for variant in args.variants.split(","):
            workdir = _workdir(variant, os.path.join(folder, variant))
            for cache in ("cold", "warm"):
                if cache == "cold":  # the benchmark's own workdir: its training run filled the cache
                    shutil.rmtree(os.path.join(workdir, "compilation_cache"), ignore_errors=True)
                start = time.perf_counter()
                subprocess.run([sys.executable, "run.py", "predict", "--workdir", workdir, "--ct", ct, "--center",
                                center_arg, "--diameter", str(diameter), "--json"], cwd=ROOT, env=env, check=True,
                               capture_output=True)
                end_to_end = time.perf_counter() - start
                if cache == "cold":
                    shutil.rmtree(os.path.join(workdir, "compilation_cache"))
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--parts", workdir, ct, center_arg,
                                      str(diameter)], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
                parts = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"variant": variant, "cache": cache, "end_to_end_s": end_to_end,
                             **{f"{p}_s": parts[p] for p in PARTS}, "load_average": machine.load_average()})
                print(f"{variant:8} {cache:5} {end_to_end:10.1f} " + " ".join(f"{parts[p]:10.2f}" for p in PARTS) +
                      f"   load average {machine.load_average()}", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
