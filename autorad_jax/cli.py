r"""autorad-jax: lung-nodule malignancy from CT with AutoRad-Lung in JAX/Flax.

Usage: autorad [SUBCOMMAND] [--flags]   (or, in a checkout, python run.py [SUBCOMMAND] [--flags])

Subcommands (default: demo):
  demo     make demo data if absent, build the dataset, train and evaluate the tiny model and a baseline
  synth    write demo LIDC-IDRI data (real geometry and ratings, simulated intensities) in the TCIA layout, or
           with --layout table a demo cohort (MetaImage CTs, masks, a nodules.csv with pathology-style labels)
  prepare  build the lidc_idri TFDS dataset from LIDC-IDRI on disk (--manual_dir) into --data_dir, or with
           --dataset nodule_table the dataset of the nodules.csv in --manual_dir
  train    train and evaluate a config in --workdir (resumes from its checkpoints)
  eval     evaluate the best checkpoint of --workdir on --split; with --config.data.name=nodule_table (and the
           --data_dir holding it) on an external cohort, into --workdir/external/nodule_table
  cv       5-fold patient cross-validation of the model and the baselines, with a summary table
  encoders train the model with each tower family (AIMv2, CLIP, SigLIP) pretrained and random-init
           (config.encoders) in --workdir, and compare them against the first on the same test patients
  predict  malignancy of nodules in a new CT (--ct with --mask, --center/--diameter or --xml; --report DIR for
           pictures with saliency), or of every row of a CSV (--nodules FILE.csv, LUNA16 columns with --ct_root)
  export   write the trained model of --workdir as transformers and PyTorch folders to --out
  compare  patient-bootstrap differences of test runs: compare WORKDIR_A WORKDIR_B ... (or --workdirs=A,B)
           into --out (default workdir/comparison); paired on the same nodules, unpaired across datasets

Configs: --config configs/autorad_lung.py:tiny --config.optim.learning_rate=1e-3 (a misspelt key is an error); the
default is the packaged configs/autorad_lung.py:tiny.

Optional parts are extras of the package: synth (and the demo's first run) needs autorad-jax[demo], predict
--backend torch needs autorad-jax[torch], Beam builds need autorad-jax[beam]; a command that needs one names it.

Output: library logs at WARNING (--verbosity=0 for INFO), one progress bar per long phase, the command's result
last; --json prints the result alone, as JSON.
"""

import contextlib
import os
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import autorad_jax
import configs

config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(configs.__file__), "autorad_lung.py:tiny"),
    "Experiment config file:variant.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "Checkpoints, metrics and reports go here.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "LIDC-IDRI as downloaded from TCIA (prepare).")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                 "TFDS data dir; overrides config.data.data_dir (eval: else the training's).")
_BUILDER_CONFIG = flags.DEFINE_string("builder_config", None, "lidc_idri builder config (prepare).")
_DATASET = flags.DEFINE_enum("dataset", None, ["lidc_idri", "nodule_table"],
                             "Dataset to build (prepare; default config.data.name): LIDC-IDRI in the TCIA layout, or "
                             "the nodules.csv of a labelled cohort in --manual_dir.")
_LAYOUT = flags.DEFINE_enum("layout", "tcia", ["tcia", "table"],
                            "synth: LIDC-IDRI's TCIA layout, or a nodule table (MetaImage CTs, masks, nodules.csv).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Processes writing demo scans (synth) or the dataset (prepare).",
                                     lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Output folder (synth, export, compare).")
_WORKDIRS = flags.DEFINE_list("workdirs", None, "Workdirs to compare, the first is A (compare).")
_NUM_SCANS = flags.DEFINE_integer("num_scans", 8, "Number of scans to generate (synth).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed (synth).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate (eval).")
_CHECKPOINT = flags.DEFINE_integer("checkpoint", None, "Checkpoint step (eval, export); default: the best.")
_PRETRAINED_DIR = flags.DEFINE_string("pretrained_dir", None,
                                      "Local AIMv2(-LiT), CLIP or SigLIP save_pretrained folder (demo).")
flags.DEFINE_alias("aimv2_dir", "pretrained_dir")
_CT = flags.DEFINE_string("ct", None, "CT: DICOM series folder, or NIfTI / NRRD / MetaImage file, in any orientation "
                          "(predict).")
_SERIES = flags.DEFINE_string(
    "series", None, "SeriesInstanceUID of the series to read from a --ct folder holding several (default: the one the "
    "--xml names, else the largest axial CT stack) (predict).")
_MASK = flags.DEFINE_string("mask", None, "Nodule mask on the CT grid (predict).")
_CENTER = flags.DEFINE_list("center", None, "Nodule centre x,y,z in patient LPS mm (DICOM's and LUNA16's convention; "
                             "RAS mm with --coordinates=ras), with --diameter (predict).")
_COORDINATES = flags.DEFINE_enum(
    "coordinates", "lps", ["lps", "ras"], "Convention of --center and of the CSV's coordX/Y/Z where its row has no "
    "'coordinates' column value: lps (patient LPS mm, x to the left, y to the back) or ras (x, y negated: NIfTI tools, "
    "3D Slicer) (predict).")
_DIAMETER = flags.DEFINE_float("diameter", None, "Nodule diameter in mm; a sphere is used as the mask (predict).")
_XML = flags.DEFINE_string("xml", None, "LIDC reader XML giving the nodule (predict).")
_XML_MATCHES_CT = flags.DEFINE_bool(
    "xml_matches_ct", False, "The --xml names no series but was made for this --ct: use it anyway (predict).")
_KEEP_INCOMPLETE = flags.DEFINE_bool(
    "keep_incomplete", False, "Nodules with readers' marks on slices their series lacks (cut by the end of the "
    "series): write them from the slices there are, flagged complete=False (prepare), or predict them (predict --xml); "
    "by default they are skipped and named.")
_HU_RANGE = flags.DEFINE_list(
    "hu_range", None, "lo,hi: the CT values predict accepts, in HU (default -3100,5000; wider for extended-scale "
    "scans with metal).")
_EXPORT = flags.DEFINE_string("export", None, "An exported model folder instead of --workdir (predict).")
_BACKEND = flags.DEFINE_enum("backend", "jax", ["jax", "torch"], "Which model runs (predict).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace what is there: an earlier export in --out (export); a dataset in --data_dir built from "
    "other series (prepare).")
_REPORT = flags.DEFINE_string("report", None, "Folder for a report picture per nodule and an index.html (predict).")
_NODULES = flags.DEFINE_string("nodules", None, "CSV with one nodule per row, e.g. LUNA16's annotations.csv: centres "
                               "coordX,coordY,coordZ in patient LPS mm (predict).")
_CT_ROOT = flags.DEFINE_string("ct_root", None, "Folder holding the CSV's <seriesuid>.mhd files or DICOM series folders "
                               "(predict --nodules).")
_JSON = flags.DEFINE_bool("json", False, "Print the command's result alone, as JSON.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (else $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (else $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: index of this process (else $JAX_PROCESS_ID).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: let JAX find the other processes (TPU pod slice, SLURM, Open MPI, Kubernetes).")
_VERSION = flags.DEFINE_bool("version", False, "Print the version of autorad-jax and exit.")

_PROG = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "autorad"
SUBCOMMANDS = ("demo", "synth", "prepare", "train", "eval", "cv", "encoders", "predict", "export", "compare")


def _config():
    config = flags.FLAGS.config
    if _DATA_DIR.value:
        config.data.data_dir = _DATA_DIR.value
    return config


def _override(key: str):
    """The value of --config.<key> on the command line, None when it was not given."""
    return config_flags.get_override_values(flags.FLAGS["config"]).get(key)


def _data_dir_given() -> str | None:
    """The data_dir of --data_dir or --config.data.data_dir, None when neither was given."""
    return _DATA_DIR.value or _override("data.data_dir")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a one-line error for a config override naming a key the config does not have."""
    try:
        argv = flags.FLAGS(argv)
        if flags.FLAGS["verbosity"].using_default_value:  # absl would raise it to INFO; --verbosity=0 asks for that
            flags.FLAGS.verbosity = logging.WARNING
        return argv
    except (AttributeError, KeyError) as e:
        reason = str(e.args[0]).strip("\"'").replace("\\n", " ").replace("\\'", "'")
        sys.exit(f"{_PROG}: --config override: the config has no key {reason}")
    except SystemExit as e:  # absl prints the usage for --help and exits 1; asking for help is no error.
        sys.exit(0 if set(argv) & {"-h", "-?", "--help", "--helpshort", "--helpfull"} else e.code)
    except flags.Error as e:
        sys.exit(f"{_PROG}: {e}\nSee {_PROG} --help.")


def _hu_range(values: list[str]) -> tuple[float, float]:
    """--hu_range lo,hi as two increasing numbers, else a UsageError."""
    try:
        lo, hi = (float(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--hu_range {','.join(values)}: expected two numbers lo,hi in HU.") from None
    if not lo < hi:
        raise app.UsageError(f"--hu_range {','.join(values)}: lo must be below hi.")
    return lo, hi


def _run(command: str, args: list[str]):
    """Calls the one library function behind `command` (imported here: each pulls in a different stack)."""
    if command in ("demo", "train", "eval", "cv", "encoders"):
        from autorad_jax.train import distributed
        distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               auto=_DISTRIBUTED.value)
    if command == "demo":
        from autorad_jax import demo
        return demo.run_demo(_config(), _WORKDIR.value, pretrained_dir=_PRETRAINED_DIR.value)
    if command == "synth":
        from tfds_lidc import synth
        if _LAYOUT.value == "table":
            return synth.generate_table(_OUT.value or "workdir/cohort_demo", _NUM_SCANS.value, seed=_SEED.value)
        return synth.generate(_OUT.value or "workdir/lidc_demo", _NUM_SCANS.value, seed=_SEED.value,
                              num_workers=_NUM_WORKERS.value)
    if command == "prepare":
        if not _MANUAL_DIR.value:
            raise app.UsageError("prepare needs --manual_dir (LIDC-IDRI as downloaded from TCIA).")
        import tfds_lidc
        return tfds_lidc.prepare(_MANUAL_DIR.value, _DATA_DIR.value or _config().data.data_dir,
                                 builder_config=_BUILDER_CONFIG.value, num_workers=_NUM_WORKERS.value,
                                 overwrite=_OVERWRITE.value, keep_incomplete=_KEEP_INCOMPLETE.value,
                                 dataset=_DATASET.value or _config().data.name)
    if command in ("train", "eval", "cv"):
        from autorad_jax.train import trainer
        if command == "train":
            return trainer.train_and_evaluate(_config(), _WORKDIR.value)
        if command == "eval":
            return trainer.evaluate(_config(), _WORKDIR.value, split=_SPLIT.value, step=_CHECKPOINT.value,
                                    data_dir=_data_dir_given(), dataset=_override("data.name"))
        from autorad_jax.train import cv
        return cv.cross_validate(_config(), _WORKDIR.value)
    if command == "encoders":
        from autorad_jax.train import compare, encoders
        result = encoders.compare_encoders(_config(), _WORKDIR.value)
        print(compare.format_table(result))
        return result
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
    explicit_workdir = flags.FLAGS["workdir"].present  # its default is not meant when --export is given
    model = dict(workdir=_WORKDIR.value if explicit_workdir or not _EXPORT.value else None, export_dir=_EXPORT.value,
                 backend=_BACKEND.value)
    if _NODULES.value:
        from autorad_jax import batch_predict
        return batch_predict.predict_csv(_NODULES.value, _OUT.value or "predictions", ct_root=_CT_ROOT.value,
                                         report_dir=_REPORT.value, coordinates=_COORDINATES.value, **model)
    from autorad_jax import predict
    from tfds_lidc import image_checks
    return predict.predict(ct=_CT.value, mask=_MASK.value, center=_CENTER.value, diameter=_DIAMETER.value,
                           xml=_XML.value, report_dir=_REPORT.value,
                           hu_range=_hu_range(_HU_RANGE.value) if _HU_RANGE.value else image_checks.DEFAULT_HU_RANGE,
                           xml_matches_ct=_XML_MATCHES_CT.value, series=_SERIES.value,
                           coordinates=_COORDINATES.value, keep_incomplete=_KEEP_INCOMPLETE.value, **model)


def _show(command: str, result) -> None:
    """Prints the result of `command` as the last thing on screen (alone, as JSON, with --json)."""
    from autorad_jax import console
    if _JSON.value or (command == "predict" and not _NODULES.value):
        print(console.to_json(result, indent=2))
    elif command == "train":
        import jax
        from autorad_jax.train.trainer import training_summary
        if jax.process_index() == 0:
            print(training_summary(result, os.path.abspath(_WORKDIR.value)))
    elif command == "export":
        print(f"Exported to {result} (model card: {os.path.join(result, 'README.md')})")
    elif command == "predict":
        print(f"{result['predicted']} nodules from {result['rows']} rows (rows with an error: {result['errors']}) in "
              f"{result['seconds']:.1f} s ({result['nodules_per_second']:.2f} nodules/s): {result['csv']}, "
              f"{result['json']}" + (f", {result['report']['html']}" if "report" in result else ""))


def rerun_command(argv: list[str], overrides: dict) -> str:
    """The command line `argv` with each `--config.<key>` of `overrides` set to its value (replaced or added)."""
    keys = {f"--config.{k}" for k in overrides}
    kept, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in keys:
            skip = "=" not in arg  # '--config.key value' takes the next argument too
        else:
            kept.append(arg)
    prog = ["python", argv[0]] if argv[0].endswith(".py") else [argv[0]]
    return shlex.join(prog + kept + [f"--config.{k}={v}" for k, v in overrides.items()])


def main(argv):
    if _VERSION.value:
        print(f"autorad-jax {autorad_jax.__version__}")
        return
    command = argv[1] if len(argv) >= 2 else "demo"
    if len(argv) > 2 and command != "compare":
        raise app.UsageError(f"Expected one subcommand, got {argv[1:]}")
    if command not in SUBCOMMANDS:
        raise app.UsageError(f"Unknown subcommand {command!r}; choose from {', '.join(SUBCOMMANDS)}.")
    logging.info("%s %s", _PROG, command)
    from autorad_jax import console
    from autorad_jax.errors import AutoradError, missing_extra
    from tfds_lidc.errors import LidcDataError
    console.quiet_third_party()
    try:
        with contextlib.redirect_stdout(sys.stderr) if _JSON.value else contextlib.nullcontext():
            result = _run(command, argv[2:])
    except (AutoradError, LidcDataError) as e:
        # Bad input and the library's own errors (missing dataset, incompatible checkpoint, NaN loss, ...) say
        # what is wrong and what to run; a traceback would only hide that. Anything else keeps its traceback.
        advice = f" Run: {rerun_command(sys.argv, e.overrides)}" if getattr(e, "overrides", None) else ""
        sys.exit(f"{_PROG} {command}: {type(e).__name__}: {e}{advice}")
    except ModuleNotFoundError as e:  # an optional dependency group (pyproject.toml's extras) that is not installed
        extra = missing_extra(e)
        if extra is None:
            raise
        sys.exit(f"{_PROG} {command}: needs the '{extra}' extra ({e.name} is not installed): "
                 f"pip install 'autorad-jax[{extra}]'")
    _show(command, result)
    if command == "predict" and _NODULES.value and result["errors"]:  # written, but a script must not take it as done
        sys.exit(f"{_PROG} predict: {result['errors']} of {result['rows']} rows could not be predicted; each "
                 f"row's error is in {result['csv']}.")


def run() -> None:
    """The `autorad` console script (and `python run.py`)."""
    # absl's --help prints the main module's docstring and key flags: make them this module's.
    sys.modules["__main__"].__doc__ = __doc__
    for flag in flags.FLAGS.get_flags_for_module(__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main, flags_parser=_parse_flags)
