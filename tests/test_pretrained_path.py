"""The path a real run takes: train from a local pretrained AIMv2(-LiT) folder (a random `transformers` Aimv2Model with
CLIP tokenizer files, saved with save_pretrained), then move that folder away and resume, evaluate, export and
predict from the workdir alone."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from autorad_jax import export, modeling
from autorad_jax.data import pipeline
from autorad_jax.data.tokenizer import load_tokenizer
from autorad_jax.models.prompt_learner import PromptLearner
from autorad_jax.predict import predict
from autorad_jax.train import checkpointing, experiment, trainer
from autorad_jax.weights import pretrained as folders
from fault_checks import ROOT
from test_train import train_config

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
              patch_size=14, use_head=True)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=49408,
            max_position_embeddings=32, eos_token_id=49407)


def _save(model: torch.nn.Module, folder: str, with_tokenizer: bool) -> dict[str, np.ndarray]:
    """Saves a random transformers model (non-trivial norms) as a user's pretrained folder; returns its weights."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    if with_tokenizer:
        load_tokenizer().save_pretrained(folder)  # CLIPTokenizer.save_pretrained: vocab.json, merges.txt, ...
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(joint folder, its weights, vision-only folder, its weights)."""
    torch.manual_seed(0)
    joint = str(tmp_path_factory.mktemp("aimv2_lit"))
    vision = str(tmp_path_factory.mktemp("aimv2_vision"))
    joint_weights = _save(transformers.Aimv2Model(transformers.Aimv2Config(
        vision_config=VISION, text_config=TEXT, projection_dim=16)), joint, with_tokenizer=True)
    vision_weights = _save(transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(**VISION)), vision, False)
    return joint, joint_weights, vision, vision_weights


def _towers(restored: experiment.Restored) -> dict[str, np.ndarray]:
    model = restored.model
    return folders.nnx_to_hf_state(model.aimv2 if hasattr(model, "aimv2") else model.vision_model)


def _copy(folder: str, tmp_path_factory) -> str:
    """A copy of a pretrained folder that the test may move or delete."""
    return shutil.copytree(folder, str(tmp_path_factory.mktemp("pretrained_copy") / "aimv2"))


@pytest.fixture(scope="module")
def prompt_run(pretrained, lidc_data, tmp_path_factory):
    """Prompt training from the joint folder with SGD, binary labels (rating 3 counted as malignant) and the planes
    view on 8 devices, 4 steps,
    counting the reads of the pretrained weights; the folder is then deleted for everything that follows."""
    joint, weights, _, _ = pretrained
    folder = _copy(joint, tmp_path_factory)
    workdir = str(tmp_path_factory.mktemp("prompt_run"))
    config = prompt_config(lidc_data, folder, num_steps=4)
    reads = []
    original = folders.read_safetensors
    folders.read_safetensors = lambda path: reads.append(path) or original(path)
    try:
        result = trainer.train_and_evaluate(config, workdir)
    finally:
        folders.read_safetensors = original
    shutil.rmtree(folder)
    return config, workdir, result, weights, reads


def prompt_config(lidc_data, pretrained_dir: str, num_steps: int):
    config = train_config(lidc_data, num_steps=num_steps, pretrained_dir=pretrained_dir)
    config.optim.name = "sgd"
    config.data.update(view="planes", label_scheme="binary", label_rule="mean_3malignant")
    return config


def test_a_fresh_run_reads_the_pretrained_weights_once_and_trains_on_them(prompt_run):
    config, workdir, result, weights, reads = prompt_run
    assert len(reads) == 1 and result["step"] == 4
    restored = experiment.load_model(workdir)
    assert restored.spec.class_names == ("benign lung nodule", "malignant lung nodule")
    towers = _towers(restored)
    assert set(towers) == set(weights)
    for key, value in weights.items():  # prompt training leaves the towers as the folder had them
        np.testing.assert_array_equal(towers[key], value, err_msg=key)
    state = nnx.state(restored.model.prompt_learner)
    assert np.abs(np.asarray(state["meta_net"]["linear2"]["bias"][...])).max() > 0  # the prompt learner trained


def test_without_the_pretrained_folder_resume_eval_export_and_predict_work(prompt_run, lidc_data, tmp_path):
    config, workdir, first, _, _ = prompt_run
    assert not os.path.exists(config.model.pretrained_dir)
    # eval with the command line's config, which need not match the run's (only data_dir is taken from it)
    other = train_config(lidc_data)
    metrics = trainer.evaluate(other, workdir, split="test", step=first["best_step"])
    for key in ("accuracy", "auc_macro", "balanced_accuracy"):
        np.testing.assert_equal(metrics[key], first["test"][key])

    out = export.export(workdir, str(tmp_path / "export"))
    series = sorted(glob.glob(os.path.join(os.path.dirname(lidc_data), "scans", "*", "*", "*")))[0]
    xml = glob.glob(os.path.join(series, "*.xml"))[0]
    runs = [predict(ct=series, xml=xml, backend=backend, **where)
            for where in ({"workdir": workdir}, {"export_dir": out}) for backend in ("jax", "torch")]
    probs = [np.array([list(n["probabilities"].values()) for n in r["nodules"]]) for r in runs]
    assert probs[0].shape[1] == 2
    for p in probs[1:]:
        np.testing.assert_allclose(p, probs[0], atol=1e-4)

    assert trainer.train_and_evaluate(prompt_config(lidc_data, config.model.pretrained_dir, 6), workdir)["step"] == 6


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_init_from_a_folder_reads_the_towers_and_draws_the_rest_as_a_random_init_does(pretrained, lidc_data,
                                                                                      scan_layers):
    """The towers and the prompts' token embeddings come from the folder, everything else from the seed."""
    joint, weights, _, _ = pretrained
    config = train_config(lidc_data, pretrained_dir=joint, trainable="full", scan_layers=scan_layers)
    exp = experiment.make_experiment(config, modeling.resolve_spec(config, pipeline.radiomics_names(config.data)))
    state = exp.init_state()
    random_config = config.copy_and_resolve_references()
    random_config.model.pretrained_dir = ""
    random_state = experiment.make_experiment(random_config, exp.spec).init_state()
    towers = folders.nnx_to_hf_state(nnx.merge(exp.graphdef, state)[0].aimv2)
    assert towers.keys() == weights.keys()
    assert all(np.array_equal(v, weights[k]) for k, v in towers.items())
    # The prompts read through the folder's token table: SOS, the ctx_init phrase, the class words, '.' and EOS.
    learner = nnx.merge(exp.graphdef, state)[0].prompt_learner
    rows = weights["text_model.embeddings.token_embedding.weight"][np.asarray(exp.spec.prompts.ids)]
    n_ctx = exp.spec.prompts.n_ctx
    assert exp.spec.prompts.ctx_from_tokens
    for name, value, expected in (("token_prefix", learner.token_prefix, rows[:, :1]),
                                  ("ctx", learner.ctx, rows[0, 1:1 + n_ctx]),
                                  ("token_suffix", learner.token_suffix, rows[:, 1 + n_ctx:])):
        np.testing.assert_array_equal(np.asarray(value[...]), expected, err_msg=name)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    from_table = ("['ctx']", "['token_prefix']", "['token_suffix']")
    drawn = [(jax.tree_util.keystr(path), leaf, expected)
             for (path, leaf), expected in zip(leaves, jax.tree.leaves(random_state))
             if not any(part in jax.tree_util.keystr(path) for part in ("['aimv2']", *from_table))]
    assert 0 < len(drawn) < len(leaves) and any("meta_net" in name for name, _, _ in drawn)
    for name, leaf, expected in drawn:
        # the same draws; another compiled program may round a scaled draw differently (1 ulp)
        np.testing.assert_allclose(leaf, expected, rtol=1e-6, atol=0, err_msg=name)
    assert [leaf.sharding for _, leaf in leaves] == jax.tree.leaves(exp.shardings)


def test_a_checkpoint_whose_prompts_were_embedded_with_another_table_is_refused(pretrained, lidc_data, tmp_path,
                                                                                monkeypatch):
    """A run from a folder whose prompt embeddings stayed those of the random table it was built with (as before they
    were taken from the folder) is named when read back, not evaluated or exported."""
    monkeypatch.setattr(PromptLearner, "embed_tokens", lambda self, tokens, table: None)
    trainer.train_and_evaluate(prompt_config(lidc_data, pretrained[0], num_steps=2), str(tmp_path))
    monkeypatch.undo()
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match="fixed token embeddings .* Train it again"):
        experiment.load_model(str(tmp_path))


@pytest.mark.parametrize("name", ["radiomics_logreg", "radiomics_mlp"])
def test_a_model_without_towers_ignores_the_folder_that_cv_and_the_demo_give_every_model(pretrained, lidc_data, name):
    config = train_config(lidc_data, pretrained_dir=pretrained[0], name=name)
    exp = experiment.make_experiment(config, modeling.resolve_spec(config, pipeline.radiomics_names(config.data)))
    assert exp.spec.towers is None
    random_config = config.copy_and_resolve_references()
    random_config.model.pretrained_dir = ""
    for leaf, expected in zip(jax.tree.leaves(exp.init_state()),
                              jax.tree.leaves(experiment.make_experiment(random_config, exp.spec).init_state())):
        np.testing.assert_array_equal(leaf, expected)


def test_both_layouts_train_the_same_model_from_a_folder(pretrained, lidc_data):
    """scan_layers is a choice of speed: from one folder and seed, two full fine-tuning steps of the scanned layout
    give the losses and weights of the unrolled one (the transformers layout)."""
    joint = pretrained[0]
    runs = []
    for scan in (False, True):
        config = train_config(lidc_data, pretrained_dir=joint, trainable="full", scan_layers=scan)
        names = pipeline.radiomics_names(config.data)
        size, batch_size = pipeline.crop_size(config.data), config.data.batch_size
        batch = {"view": np.random.default_rng(1).integers(-1000, 400, (batch_size, size, size, 3)).astype(np.int16),
                 "radiomics": np.random.default_rng(2).standard_normal((batch_size, len(names)), np.float32),
                 "label": np.arange(batch_size, dtype=np.int32) % 3}
        exp = experiment.make_experiment(config, modeling.resolve_spec(config, names))
        state, losses = exp.init_state(), []
        for _ in range(2):
            state, metrics = exp.train_step(state, pipeline.to_global(batch, exp.batch_sharding))
            losses.append(float(metrics["loss"]))
        runs.append((losses, folders.nnx_to_hf_state(nnx.merge(exp.graphdef, state)[0].aimv2)))
    (unrolled_losses, unrolled), (scanned_losses, scanned) = runs
    np.testing.assert_allclose(scanned_losses, unrolled_losses, rtol=1e-5)
    assert scanned.keys() == unrolled.keys()
    for key, value in scanned.items():
        np.testing.assert_allclose(value, unrolled[key], rtol=0, atol=1e-5 * np.abs(unrolled[key]).max() + 1e-7,
                                   err_msg=key)


@pytest.mark.parametrize("options,accum", [
    (dict(trainable="last_k", trainable_last_k=1, dtype="bfloat16", remat="dots"), 2),
    (dict(trainable="full"), 1),
], ids=["last_k_bf16_accum_remat", "full"])
def test_vision_training_from_the_joint_folder(pretrained, lidc_data, options, accum):
    """Two updates of the sharded train step on 8 devices, from the pretrained towers: only what the mode trains
    moves."""
    joint, weights, _, _ = pretrained
    config = train_config(lidc_data, pretrained_dir=joint, **options)
    config.optim.grad_accum_steps = accum
    exp = experiment.make_experiment(config, modeling.resolve_spec(config, pipeline.radiomics_names(config.data)))
    assert exp.mesh.devices.size == 8
    recs = pipeline.records(config.data, "train")
    batches = iter(pipeline.train_loader(config.data, recs, pipeline.RadiomicsStats.fit(recs.radiomics), seed=0))
    state = exp.init_state()
    for _ in range(2 * accum):
        state, metrics = exp.train_step(state, pipeline.to_global(next(batches), exp.batch_sharding))
        assert bool(metrics["finite"])
    model, _ = nnx.merge(exp.graphdef, state)
    towers = folders.nnx_to_hf_state(model.aimv2)
    changed = {k for k in weights if not np.array_equal(towers[k], weights[k])}
    assert changed and all(k.startswith(("vision_model.", "visual_projection.")) for k in changed)
    if options["trainable"] == "last_k":
        assert not any(k.startswith("vision_model.encoder.layers.0.") for k in changed)
        assert any(k.startswith("vision_model.encoder.layers.1.") for k in changed)
    else:
        assert any(k.startswith("vision_model.embeddings.") for k in changed)


def test_linear_probe_from_a_vision_only_folder(pretrained, lidc_data, tmp_path, tmp_path_factory):
    vision, weights = pretrained[2], pretrained[3]
    folder = _copy(vision, tmp_path_factory)
    trainer.train_and_evaluate(train_config(lidc_data, pretrained_dir=folder, name="linear_probe"), str(tmp_path))
    shutil.rmtree(folder)
    towers = _towers(experiment.load_model(str(tmp_path)))
    for key, value in weights.items():
        np.testing.assert_array_equal(towers[key], value, err_msg=key)


def test_a_joint_model_cannot_start_from_a_vision_only_folder(pretrained, lidc_data):
    _, _, vision, _ = pretrained
    config = train_config(lidc_data, pretrained_dir=vision)
    with pytest.raises(folders.PretrainedFolderError, match="needs a joint image-text model"):
        modeling.towers_config(config.model)


def test_models_import_neither_transformers_nor_the_tokenizer():
    code = ("import sys, autorad_jax.models; "
            "print(sorted(m for m in sys.modules if m.startswith('transformers') or m.endswith('tokenizer')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_export_refuses_a_file_and_a_folder_of_other_files_and_overwrites_only_an_export(prompt_run, tmp_path):
    _, workdir, _, _, _ = prompt_run
    target = tmp_path / "out"
    target.mkdir()
    (target / "README.md").write_text("mine")  # a name an export writes, in a folder that holds no export
    for overwrite in (False, True):
        with pytest.raises(export.ExportTargetError, match=re.escape(f"{target} holds what an export does not write "
                                                                     "(README.md)")):
            export.export(workdir, str(target), overwrite=overwrite)
    assert os.listdir(target) == ["README.md"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(export.ExportTargetError, match="is a file"):
        export.export(workdir, str(tmp_path / "file"))
    os.remove(target / "README.md")
    export.export(workdir, str(target))
    written = sorted(os.listdir(target))
    assert written == ["README.md", "aimv2", "aimv2_vision", "autorad_lung.json", "autorad_lung.safetensors"]
    with pytest.raises(export.ExportTargetError, match="holds an earlier export: add --overwrite"):
        export.export(workdir, str(target))
    (target / "autorad_lung.json").write_text("{}")  # to tell the earlier export from the new one
    with pytest.raises(checkpointing.MissingCheckpointError):  # a failed export leaves the old folder as it was
        export.export(workdir, str(target), step=12345, overwrite=True)
    assert (target / "autorad_lung.json").read_text() == "{}"
    export.export(workdir, str(target), overwrite=True)
    assert sorted(os.listdir(target)) == written
    assert sorted(os.listdir(tmp_path)) == ["file", "out"]  # nothing left beside it
    (target / "notes.txt").write_text("mine")
    with pytest.raises(export.ExportTargetError, match=r"holds what an export does not write \(notes\.txt\)"):
        export.export(workdir, str(target), overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    config = json.loads((target / "autorad_lung.json").read_text())
    assert config["class_names"] == ["benign lung nodule", "malignant lung nodule"]
