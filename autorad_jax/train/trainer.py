"""Training and evaluation: `train_and_evaluate(config, workdir)` and `evaluate(config, workdir, split, step)`.

The workdir holds everything a run makes: checkpoints/ (orbax), reports/<split>_step<N>/ (metrics.json, metrics.csv,
predictions.csv, roc.png, confusion.png, reliability.png), tensorboard/, train_metrics.jsonl, and the latest test
report at its top level. A run resumes from its workdir's latest checkpoint; only process 0 writes reports.

Models in `models.NO_STEP_MODELS` run no training step: on a fresh start the logistic regression is fitted as a convex
problem (`convex_fit`; its C and grid go to workdir/convex_fit.json) and zero-shot is kept as built; the state is
evaluated on validation and saved as the step-0 checkpoint, which eval, predict and cv read as any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from autorad_jax import modeling, models
from autorad_jax.data import pipeline
from autorad_jax.data.prefetch import prefetch_to_device
from autorad_jax.errors import AutoradError
from autorad_jax.models.spec import ModelSpec
from autorad_jax.train import checkpointing, collector, compilation_cache, perf, profiling, steps, workdir_lock
from autorad_jax.train.bootstrap import evaluation_metrics, format_value
from autorad_jax.train.experiment import Experiment, make_experiment, restore, restore_checkpoint
from autorad_jax.train.metrics import scalar_metrics
from autorad_jax.train.optim import learning_rate_schedule
from autorad_jax.train.metric_writer import MetricWriter


class NonFiniteLossError(AutoradError, FloatingPointError):
    """Training produced a NaN or infinite loss, gradient or parameter; nothing after the last good step is saved.
    `overrides` holds the config changes ('optim.learning_rate': value) the message advises for the rerun."""

    def __init__(self, message: str, overrides: dict | None = None):
        super().__init__(message)
        self.overrides = dict(overrides or {})


# ------------------------------------------------------------------------------------------------------------------
# Evaluation.
# ------------------------------------------------------------------------------------------------------------------

def predict_records(exp: Experiment, state: nnx.State, recs: pipeline.Records,
                    stats: pipeline.RadiomicsStats) -> np.ndarray:
    """Class probabilities [N, C] of every record, in record order (on every process). The next batches are made and
    placed on the devices while a step runs: each step's output is fetched only after the next step is dispatched."""
    eval_step = exp.eval_step
    probs = np.full((len(recs), len(exp.spec.class_names)), np.nan, np.float32)

    def collect(out) -> None:
        p, idx = np.asarray(out[0]), np.asarray(out[1])
        probs[idx[idx >= 0]] = p[idx >= 0]

    pending = None
    for batch in prefetch_to_device(pipeline.eval_batches(exp.config.data, recs, stats), exp.batch_sharding):
        out = eval_step(state, batch)
        if pending is not None:
            collect(pending)
        pending = out
    if pending is not None:
        collect(pending)
    return probs


def _report_dir(workdir: str, split: str, step: int) -> str:
    return os.path.join(workdir, "reports", f"{split}_step{step}")


def evaluate_records(exp: Experiment, state: nnx.State, recs: pipeline.Records, stats: pipeline.RadiomicsStats, *,
                     split: str, step: int, workdir: str, writer: MetricWriter | None = None) -> dict:
    """Metrics of `state` on `recs` with their patient-bootstrap 95% intervals, and a report in
    workdir/reports/<split>_step<step>/ (process 0)."""
    from autorad_jax.train.reports import write_report  # matplotlib and scikit-learn: 2 s not spent before a first step
    probs = predict_records(exp, state, recs, stats)
    names = pipeline.label_names(exp.config.data.label_scheme)
    metrics = evaluation_metrics(recs.labels, probs, names, recs.patients, recs.diameters)
    if jax.process_index() == 0:
        out = _report_dir(workdir, split, step)
        write_report(out, metrics, recs.labels, probs, names, recs.patients,
                     info={"split": split, "step": step, "model": exp.config.model.name,
                           "cv_fold": int(exp.config.data.cv_fold), "dataset": pipeline.dataset_name(exp.config.data)})
        if writer is not None:
            writer.write(step, scalar_metrics(metrics), prefix=split)
        logging.info("%s step %d: %s", split, step,
                     ", ".join(f"{k}={metrics[k]:.4f}" for k in ("accuracy", "balanced_accuracy", "auc_macro")))
    return metrics


def _publish(workdir: str, split: str, step: int) -> None:
    """Copies a report to the workdir's top level (the run's headline metrics.json, predictions.csv, PNGs)."""
    if jax.process_index() != 0:
        return
    src = _report_dir(workdir, split, step)
    for name in ("metrics.json", "metrics.csv", "predictions.csv", "roc.png", "confusion.png", "reliability.png"):
        shutil.copyfile(os.path.join(src, name), os.path.join(workdir, name))


def _check_dataset(spec: ModelSpec, data_config: ml_collections.ConfigDict, workdir: str) -> None:
    """DatasetError unless the dataset's radiomics features are the ones the checkpoint was trained on."""
    names = pipeline.radiomics_names(data_config)
    if tuple(names) != spec.radiomics_names:
        raise pipeline.DatasetError(
            f"The dataset in {data_config.data_dir} has {len(names)} radiomics features but the checkpoint in "
            f"{workdir} was trained on {spec.num_radiomics} others (or in another order): rebuild the dataset with "
            f"`autorad prepare` using the same radiomics parameters, or use another --workdir.")


def evaluate(config: ml_collections.ConfigDict, workdir: str, split: str = "test", step: int | None = None, *,
             data_dir: str | None = None, dataset: str | None = None) -> dict:
    """Metrics of a checkpoint of `workdir` (default: the best by validation AUC) on `split`, with its report.

    The model and its data settings come from the checkpoint, the dataset from where its training read it unless
    `data_dir` says where it is now; `config` gives only the eval batch size and the mesh. `dataset` (a tfds name,
    e.g. 'nodule_table') evaluates on another dataset than the training's (external validation, radiomics statistics
    still the checkpoint's): its report goes to workdir/external/<dataset>/, the run's own test report is left as is.
    """
    data = dict(eval_batch_size=config.data.eval_batch_size) | (dict(data_dir=data_dir) if data_dir else {})
    exp, state, restored = restore_checkpoint(workdir, step, data=data, mesh=dict(config.mesh))
    if dataset and dataset != exp.config.data.name:
        exp.config.data.name = dataset
        workdir = os.path.join(workdir, "external", dataset)
    try:
        _check_dataset(restored.spec, exp.config.data, workdir)
        recs = pipeline.records(exp.config.data, split)
    except pipeline.DatasetError as e:
        if data_dir:
            raise
        raise pipeline.DatasetError(f"{e} ({exp.config.data.data_dir} is where the training of {workdir} read its "
                                    f"dataset; if the dataset has moved, say where it is now with --data_dir.)") from e
    metrics = evaluate_records(exp, state, recs, restored.stats, split=split, step=restored.step, workdir=workdir)
    if split == "test":
        _publish(workdir, split, restored.step)
    if jax.process_index() == 0:
        print(metrics_line(split, restored.step, metrics) + f"\nReport: {_report_dir(workdir, split, restored.step)}")
    return metrics


def metrics_line(split: str, step: int, metrics: dict) -> str:
    """The headline metrics of `split` at checkpoint `step`, with their patient-bootstrap intervals, on one line."""
    return f"{split} split, step {step}: " + ", ".join(
        f"{k} {format_value(metrics, k)}" for k in ("accuracy", "balanced_accuracy", "auc_macro", "f1_macro", "brier",
                                                     "ece")) + " (patient-bootstrap 95% intervals)"


def training_summary(result: dict, workdir: str) -> str:
    """What `train_and_evaluate` returned for `workdir`, as the lines `run.py train` prints last."""
    if result.get("preempted"):
        return f"Stopped at step {result['step']} by SIGTERM, its checkpoint saved in {workdir}: run again to resume."
    auc = result["validation"]["auc_macro"]
    picked = ("validation macro AUC undefined, so the latest checkpoint" if auc is None or np.isnan(auc)
              else "best checkpoint by validation macro AUC")
    lines = [f"Trained to step {result['step']} in {workdir}; {picked}: step {result['best_step']}.",
             metrics_line("validation", result["step"], result["validation"])]
    if "test" in result:
        lines += [metrics_line("test", result["best_step"], result["test"]),
                  f"Report: {_report_dir(workdir, 'test', result['best_step'])}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# Training.
# ------------------------------------------------------------------------------------------------------------------

class _Preemption:
    """A single process catches SIGTERM itself and sets a flag the loop polls; several processes agree on the step
    to stop at through JAX's preemption sync point (jax.distributed's own SIGTERM notifier)."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
            except ValueError:  # not the main thread: no handler, the process simply dies
                pass

    def reached(self, step: int, manager) -> bool:
        if jax.process_count() > 1:
            return manager.reached_preemption(step)
        return self._event.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _non_finite(step: int, metrics: dict, manager, workdir: str, config: ml_collections.ConfigDict
                ) -> NonFiniteLossError:
    """The error of a diverged run, advising a tenth of the learning rate (the packaged default for a non-finite one);
    a rerun resumes from the latest checkpoint, which holds only finite values (checked before every save)."""
    manager.wait_until_finished()
    last = manager.latest_step()
    kept = (f"the last good checkpoint (step {last}) is kept in {checkpointing.checkpoint_dir(workdir)}"
            if last is not None else "no checkpoint was written")
    lr = float(config.optim.learning_rate)
    lower = lr / 10 if math.isfinite(lr) and lr > 0 else checkpointing.saved_config({}).optim.learning_rate
    lower = float(f"{lower:g}")  # the value the message prints
    return NonFiniteLossError(
        f"Training stopped at step {step}: the loss is {metrics.get('loss', float('nan'))} and the gradient norm "
        f"{metrics.get('grad_norm', float('nan'))} (not finite); {kept}. To "
        f"{'continue from it' if last is not None else 'start again'} with a lower learning rate, rerun the same "
        f"command with --config.optim.learning_rate={lower:g} (or raise optim.warmup_steps, or check the inputs).",
        overrides={"optim.learning_rate": lower})


def fit_without_steps(exp: Experiment, state: nnx.State, train_recs: pipeline.Records, val_recs: pipeline.Records,
                      stats: pipeline.RadiomicsStats, workdir: str) -> nnx.State:
    """The state of a model the step loop does not train (models.NO_STEP_MODELS): the radiomics logistic regression
    fitted by `convex_fit` (C chosen on validation, or inside the training records in cross-validation, where
    validation is the held-out fold), recorded in workdir/convex_fit.json; zero-shot as built."""
    if exp.config.model.name != "radiomics_logreg":
        return state
    from autorad_jax.train import convex_fit  # scikit-learn: imported by the one model that needs it
    model, optimizer = nnx.merge(exp.graphdef, state)
    in_cv = int(exp.config.data.cv_fold) >= 0
    validation = None if in_cv else (stats.apply(val_recs.radiomics), val_recs.labels)
    info = convex_fit.fit_radiomics_logreg(model, stats.apply(train_recs.radiomics), train_recs.labels,
                                           train_recs.patients, validation)
    logging.info("Logistic regression: C=%g (%s)", info["C"], info["selection"])
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "convex_fit.json"), "w") as f:
            json.dump(info, f, indent=1)
    return jax.device_put(nnx.state((model, optimizer)), exp.shardings)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains config in workdir (resuming from its latest checkpoint), evaluates on validation during training and
    the best checkpoint on test at the end (with data.cv_fold >= 0: the final state on the held-out fold).

    Process 0 holds workdir/train.lock meanwhile (WorkdirLockedError naming the holder if another run has it); the
    metric writer and the checkpoint manager are closed on every path.

    Returns {'step', 'best_step', 'train_loss': [loss of each step run now], 'validation': metrics, 'test': metrics
    (absent in cross-validation)}, or
    {'step', 'preempted': True} when SIGTERM stopped the run (its checkpoint is saved; rerun to resume).
    """
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    created = _outermost_missing(workdir) if is_main else None
    if is_main:
        os.makedirs(workdir, exist_ok=True)
    compilation_cache.use_workdir_cache(config.train.compilation_cache, workdir)
    try:
        with workdir_lock.hold(workdir, active=is_main), contextlib.ExitStack() as closing:
            return _train_and_evaluate(config, workdir, closing)
    except AutoradError:
        if created:  # refused input leaves no empty workdir (nor the folders made for it) behind
            _remove_empty_folders(created)
        raise


def _outermost_missing(path: str) -> str | None:
    """The first folder of `path`, from the root down, that does not exist (what makedirs creates first); None if
    `path` exists."""
    missing = None
    while not os.path.isdir(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _remove_empty_folders(root: str) -> None:
    """Removes `root` and the folders under it that hold no file."""
    for folder, _, _ in os.walk(root, topdown=False):
        if not os.listdir(folder):
            os.rmdir(folder)


@dataclasses.dataclass
class _Start:
    """Where a run starts: the checkpoint step it resumes from (None on a fresh start), its model spec and radiomics
    statistics."""
    step: int | None
    spec: ModelSpec
    stats: pipeline.RadiomicsStats


def _resolve_start(config: ml_collections.ConfigDict, workdir: str, manager, train_recs: pipeline.Records) -> _Start:
    """The model spec and radiomics statistics of the latest checkpoint (warning about config changes), or resolved on
    a fresh start: the one place that reads config.model.pretrained_dir (config.json and tokenizer here, weights in
    init_state)."""
    step = manager.latest_step()
    if step is None:
        spec = modeling.resolve_spec(config, pipeline.radiomics_names(config.data))
        if jax.process_index() == 0:
            modeling.save_tokenizer(config.model, workdir)
        return _Start(None, spec, pipeline.RadiomicsStats.from_config(config.data, train_recs.radiomics))
    saved, stats_json, spec = checkpointing.restore_meta(manager, step)
    changes = checkpointing.check_compatible(saved, config, workdir)
    if changes:  # the next checkpoint records the new values only
        logging.warning("Resuming %s at step %d with config changes: %s.", workdir, step,
                        "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
    _check_dataset(spec, config.data, workdir)
    return _Start(step, spec, pipeline.RadiomicsStats.from_json(stats_json))


class _StepLog:
    """The host side of the steps: each step's metrics are fetched one step late (so the next step is dispatched
    first), checked for finiteness and written with the learning rate; throughput is logged every log_every steps,
    the run's first step (which compiles) and evaluation and checkpointing excepted."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, manager, writer: MetricWriter, step: int,
                 num_steps: int):
        self.config, self.workdir, self.manager, self.writer = config, workdir, manager, writer
        self.accum = config.optim.grad_accum_steps
        # The learning rate of every update, computed once: logging it then needs no device work inside the loop (an
        # eager schedule call there would wait for the step in flight).
        self.learning_rates = np.asarray(
            jax.vmap(learning_rate_schedule(config))(np.arange(max(1, -(-num_steps // self.accum)))))
        self.pbar = tqdm(total=num_steps, initial=step, disable=jax.process_index() != 0 or not num_steps,
                         dynamic_ncols=True, desc=config.model.name)
        self.peak = perf.peak_flops(jax.devices()[0])
        self.flops = None  # of the compiled step, once compiled
        self.timer = (step, None)  # (step, time) of the last timing mark; None until this run's first step finished
        self.pending = None  # (step, device metrics) not fetched yet
        self.losses = []  # training loss of each step of this run

    def dispatched(self, step: int, metrics) -> None:
        """Records the step just dispatched and fetches the one before it."""
        self.pbar.update(1)
        if self.pending is not None:
            self.fetch()
        self.pending = (step, metrics)

    def fetch(self) -> dict | None:
        """Fetches, checks and writes the pending step's metrics (None if none is pending)."""
        if self.pending is None:
            return None
        (s, m), self.pending = self.pending, None
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not m.pop("finite"):
            raise _non_finite(s, m, self.manager, self.workdir, self.config)
        m["learning_rate"] = float(self.learning_rates[(s - 1) // self.accum])
        self.writer.write(s, m, prefix="train", jsonl="train_metrics")
        self.losses.append(m["loss"])
        self.pbar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
        return m

    def timing(self, step: int, m: dict) -> None:
        """Starts the clock after the run's first step; logs steps/s and MFU every log_every steps."""
        now = time.perf_counter()
        if self.timer[1] is not None and step % self.config.train.log_every == 0:
            seconds = (now - self.timer[1]) / (step - self.timer[0])
            speed = {"steps_per_sec": 1.0 / seconds, **perf.throughput(self.flops, seconds, self.peak)}
            self.writer.write(step, speed, prefix="perf")
            self.pbar.set_postfix(loss=f"{m['loss']:.4f}", **{k: f"{v:.3g}" for k, v in speed.items()},
                                  refresh=False)
            logging.info("step %d: loss %.4f lr %.3g %s", step, m["loss"], m["learning_rate"],
                         " ".join(f"{k} {v:.3g}" for k, v in speed.items()))
        if self.timer[1] is None or step % self.config.train.log_every == 0:
            self.timer = (step, now)

    def restart_clock(self, step: int) -> None:
        """Keeps evaluation and checkpointing out of the step timing."""
        self.timer = (step, time.perf_counter())

    def close(self) -> None:
        self.pbar.close()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, closing: contextlib.ExitStack) -> dict:
    """train_and_evaluate in a locked workdir; what it opens is closed by `closing`."""
    # ---- Data -----------------------------------------------------------------------------------------------------
    train_recs = pipeline.records(config.data, "train")
    val_recs = pipeline.records(config.data, "validation")
    logging.info("%s: %d train / %d validation examples, %d radiomics features", pipeline.dataset_name(config.data),
                 len(train_recs), len(val_recs), train_recs.radiomics.shape[1])

    # ---- Checkpoint manager; model spec and radiomics statistics -------------------------------------------------
    manager = closing.enter_context(
        checkpointing.open_manager(workdir, read_only=False, keep=config.train.keep_checkpoints))
    start = _resolve_start(config, workdir, manager, train_recs)
    stats = start.stats

    # ---- Mesh, model, optimiser: abstract, then materialised sharded (or restored onto the same shardings) --------
    class_counts = np.bincount(train_recs.labels, minlength=len(start.spec.class_names))
    exp = make_experiment(config, start.spec, steps.loss_options(config.train, class_counts))
    # The next batches are placed on the devices while a step runs; the prefetcher checkpoints the grain position of
    # the batches it has handed out.
    train_iter = prefetch_to_device(iter(pipeline.train_loader(config.data, train_recs, stats, seed=config.seed)),
                                    exp.batch_sharding)
    with collector.paused():
        if start.step is not None:
            state = restore(manager, start.step, exp, workdir, data_iter=train_iter)
            logging.info("Resumed from step %d of %s", start.step, checkpointing.checkpoint_dir(workdir))
        else:
            state = exp.init_state()
    writer = closing.enter_context(contextlib.closing(MetricWriter(workdir, jax.process_index() == 0)))
    writer.drop_after(start.step or 0, "train_metrics")  # the steps after the checkpoint resumed from are logged again

    def save(step: int, state: nnx.State, val_metrics: dict | None) -> None:
        checkpointing.save(manager, step, state, train_iter, stats.to_json(), config, start.spec,
                           metrics=None if val_metrics is None else scalar_metrics(val_metrics))

    def evaluate_validation(step: int, state: nnx.State) -> dict:
        return evaluate_records(exp, state, val_recs, stats, split="validation", step=step, workdir=workdir,
                                writer=writer)

    # ---- Models without steps: fitted (or kept as built), evaluated and saved as step 0 --------------------------
    no_steps = config.model.name in models.NO_STEP_MODELS
    val_metrics = None
    if no_steps and start.step is None:
        state = fit_without_steps(exp, state, train_recs, val_recs, stats, workdir)
        val_metrics = evaluate_validation(0, state)
        save(0, state, val_metrics)

    # ---- Loop: the jitted step (explicit shardings, state donated), evaluation, checkpoints, preemption -----------
    step, num_steps, t = start.step or 0, 0 if no_steps else config.train.num_steps, config.train
    check_finite = jax.jit(steps.all_finite, in_shardings=(exp.shardings,), out_shardings=exp.replicated)
    profiler = profiling.StepProfiler(workdir, t.profile_start_step, t.profile_steps)
    log = _StepLog(config, workdir, manager, writer, step, num_steps)
    preemption = _Preemption()
    compiled = None
    try:
        while step < num_steps:
            batch = next(train_iter)
            if compiled is None:
                with collector.paused():
                    compiled = exp.train_step.lower(state, batch).compile()
                log.flops = perf.compiled_flops(compiled)
            with profiler.step(step + 1):
                state, metrics = compiled(state, batch)
            step += 1
            profiler.finished(step, metrics)
            log.dispatched(step, metrics)

            evaluate_now = step % t.eval_every == 0 or step == num_steps
            save_now = evaluate_now or step % t.checkpoint_every == 0
            preempted = preemption.reached(step, manager)
            if not (step % t.log_every == 0 or save_now or preempted or log.timer[1] is None):
                continue
            m = log.fetch()
            log.timing(step, m)
            if evaluate_now:
                val_metrics = evaluate_validation(step, state)
            if save_now or preempted:
                if not bool(check_finite(state)):
                    raise _non_finite(step, m, manager, workdir, config)
                save(step, state, val_metrics if evaluate_now else None)
            if save_now:
                log.restart_clock(step)
            if preempted:
                manager.wait_until_finished()
                logging.warning("Preempted at step %d: checkpoint saved in %s; run the same command to resume.",
                                step, checkpointing.checkpoint_dir(workdir))
                return {"step": step, "preempted": True}
        log.fetch()
    finally:
        profiler.stop()
        log.close()
        preemption.close()
        manager.wait_until_finished()

    # ---- Final evaluation -----------------------------------------------------------------------------------------
    if val_metrics is None:  # resumed at the end: evaluate the final state again
        val_metrics = evaluate_validation(step, state)
    return _final_test(exp, state, manager, workdir, writer, stats,
                       {"step": step, "best_step": checkpointing.best_step(manager), "train_loss": log.losses,
                        "validation": val_metrics})


def _final_test(exp: Experiment, state: nnx.State, manager, workdir: str, writer: MetricWriter,
                stats: pipeline.RadiomicsStats, result: dict) -> dict:
    """`result` with the test metrics of its best checkpoint, whose report is published at the workdir's top level;
    in cross-validation (no test split) the validation report of the final state is published instead."""
    if int(exp.config.data.cv_fold) >= 0:
        _publish(workdir, "validation", result["step"])
        return result
    best = result["best_step"]
    if best != result["step"]:
        state = restore(manager, best, exp, workdir)
    result["test"] = evaluate_records(exp, state, pipeline.records(exp.config.data, "test"), stats, split="test",
                                      step=best, workdir=workdir, writer=writer)
    _publish(workdir, "test", best)
    return result
