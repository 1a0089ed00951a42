r"""autorad-jax: lung-nodule malignancy from CT with AutoRad-Lung in JAX/Flax.

Usage: autorad [SUBCOMMAND] [--flags]   (or, in a checkout, python run.py [SUBCOMMAND] [--flags])

Subcommands (default: demo):
  demo     make demo data if absent, build the dataset, train and evaluate the tiny model and a baseline
  synth    write demo LIDC-IDRI data (real geometry and ratings, simulated intensities) in the TCIA layout
  prepare  build the lidc_idri TFDS dataset from LIDC-IDRI on disk (--manual_dir) into --data_dir
  train    train and evaluate a config in --workdir (resumes from its checkpoints)
  eval     evaluate the best checkpoint of --workdir on --split
  cv       5-fold patient cross-validation of the model and the baselines, with a summary table
  predict  malignancy of one nodule in a new CT (--ct with --mask, --center/--diameter or --xml)
  export   write the trained model of --workdir as transformers and PyTorch folders to --out
  compare  paired patient-bootstrap differences of test runs: compare WORKDIR_A WORKDIR_B ... (or --workdirs=A,B)
           into --out (default workdir/comparison)

Configs: --config configs/autorad_lung.py:tiny --config.optim.learning_rate=1e-3 (a misspelt key is an error); the
default is the packaged configs/autorad_lung.py:tiny.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs

config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "autorad_lung.py:tiny"),
    "Experiment config file:variant.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "Checkpoints, metrics and reports go here.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "LIDC-IDRI as downloaded from TCIA (prepare).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir; overrides config.data.data_dir.")
_BUILDER_CONFIG = flags.DEFINE_string("builder_config", None, "lidc_idri builder config (prepare).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Processes for dataset generation (prepare).")
_OUT = flags.DEFINE_string("out", None, "Output folder (synth, export, compare).")
_WORKDIRS = flags.DEFINE_list("workdirs", None, "Workdirs to compare, the first is A (compare).")
_NUM_SCANS = flags.DEFINE_integer("num_scans", 8, "Number of scans to generate (synth).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed (synth).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate (eval).")
_CHECKPOINT = flags.DEFINE_integer("checkpoint", None, "Checkpoint step (eval, export); default: the best.")
_AIMV2_DIR = flags.DEFINE_string("aimv2_dir", None, "Local AIMv2(-LiT) save_pretrained folder (demo).")
_CT = flags.DEFINE_string("ct", None, "CT: DICOM series folder, or NIfTI / NRRD / MetaImage file (predict).")
_MASK = flags.DEFINE_string("mask", None, "Nodule mask on the CT grid (predict).")
_CENTER = flags.DEFINE_list("center", None, "Nodule centre x,y,z in mm, with --diameter (predict).")
_DIAMETER = flags.DEFINE_float("diameter", None, "Nodule diameter in mm; a sphere is used as the mask (predict).")
_XML = flags.DEFINE_string("xml", None, "LIDC reader XML giving the nodule (predict).")
_EXPORT = flags.DEFINE_string("export", None, "An exported model folder instead of --workdir (predict).")
_BACKEND = flags.DEFINE_enum("backend", "jax", ["jax", "torch"], "Which model runs (predict).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace what is there: a non-empty --out folder, whole (export); a dataset in --data_dir built "
    "from other series (prepare).")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (else $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (else $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: index of this process (else $JAX_PROCESS_ID).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: let JAX find the other processes (TPU pod slice, SLURM, Open MPI, Kubernetes).")

_PROG = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "autorad"
SUBCOMMANDS = ("demo", "synth", "prepare", "train", "eval", "cv", "predict", "export", "compare")


def _config():
    config = flags.FLAGS.config
    if _DATA_DIR.value:
        config.data.data_dir = _DATA_DIR.value
    return config


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a one-line error for a config override naming a key the config does not have."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        reason = str(e.args[0]).strip("\"'").replace("\\n", " ").replace("\\'", "'")
        sys.exit(f"{_PROG}: --config override: the config has no key {reason}")
    except SystemExit as e:  # absl prints the usage for --help and exits 1; asking for help is no error.
        sys.exit(0 if set(argv) & {"-h", "-?", "--help", "--helpshort", "--helpfull"} else e.code)
    except flags.Error as e:
        sys.exit(f"{_PROG}: {e}\nSee {_PROG} --help.")


def _run(command: str, args: list[str]):
    """Calls the one library function behind `command` (imported here: each pulls in a different stack)."""
    if command in ("demo", "train", "eval", "cv"):
        from autorad_jax.train import distributed
        distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               auto=_DISTRIBUTED.value)
    if command == "demo":
        from autorad_jax import demo
        return demo.run_demo(_config(), _WORKDIR.value, aimv2_dir=_AIMV2_DIR.value)
    if command == "synth":
        from tfds_lidc import synth
        return synth.generate(_OUT.value or "workdir/lidc_demo", _NUM_SCANS.value, seed=_SEED.value)
    if command == "prepare":
        if not _MANUAL_DIR.value:
            raise app.UsageError("prepare needs --manual_dir (LIDC-IDRI as downloaded from TCIA).")
        import tfds_lidc
        return tfds_lidc.prepare(_MANUAL_DIR.value, _DATA_DIR.value or _config().data.data_dir,
                                 builder_config=_BUILDER_CONFIG.value, num_workers=_NUM_WORKERS.value,
                                 overwrite=_OVERWRITE.value)
    if command in ("train", "eval", "cv"):
        from autorad_jax import train
        if command == "train":
            return train.train_and_evaluate(_config(), _WORKDIR.value)
        if command == "eval":
            return train.evaluate(_config(), _WORKDIR.value, split=_SPLIT.value, step=_CHECKPOINT.value)
        return train.cross_validate(_config(), _WORKDIR.value)
    if command == "compare":
        from autorad_jax.train import compare
        result = compare.compare(args + (_WORKDIRS.value or []), _OUT.value or "workdir/comparison")
        print(compare.format_table(result))
        return result
    if command == "export":
        if not _OUT.value:
            raise app.UsageError("export needs --out.")
        from autorad_jax import export
        return export.export(_WORKDIR.value, _OUT.value, step=_CHECKPOINT.value, overwrite=_OVERWRITE.value)
    from autorad_jax import predict
    result = predict.predict(
        ct=_CT.value, mask=_MASK.value, center=_CENTER.value, diameter=_DIAMETER.value, xml=_XML.value,
        workdir=None if _EXPORT.value else _WORKDIR.value, export_dir=_EXPORT.value, backend=_BACKEND.value)
    print(json.dumps(result, indent=2))
    return result


def main(argv):
    command = argv[1] if len(argv) >= 2 else "demo"
    if len(argv) > 2 and command != "compare":
        raise app.UsageError(f"Expected one subcommand, got {argv[1:]}")
    if command not in SUBCOMMANDS:
        raise app.UsageError(f"Unknown subcommand {command!r}; choose from {', '.join(SUBCOMMANDS)}.")
    logging.info("%s %s", _PROG, command)
    from autorad_jax.errors import AutoradError
    from tfds_lidc.errors import LidcDataError
    try:
        _run(command, argv[2:])
    except (AutoradError, LidcDataError) as e:
        # Bad input and the library's own errors (missing dataset, incompatible checkpoint, NaN loss, ...) say
        # what is wrong and what to run; a traceback would only hide that. Anything else keeps its traceback.
        sys.exit(f"{_PROG} {command}: {type(e).__name__}: {e}")


def run() -> None:
    """The `autorad` console script (and `python run.py`)."""
    # absl's --help prints the main module's docstring and key flags: make them this module's.
    sys.modules["__main__"].__doc__ = __doc__
    for flag in flags.FLAGS.get_flags_for_module(__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main, flags_parser=_parse_flags)
