"""Export to transformers and PyTorch: the PyTorch model's logits against the JAX model's, the exported towers against
transformers' own AIMv2 classes, and export folders that are incomplete or from another model."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import Aimv2Model, Aimv2VisionModel

from autorad_jax import export, modeling, models
from autorad_jax.data import pipeline, preprocess
from autorad_jax.weights import pretrained
from autorad_jax.weights.name_map import WeightsMismatchError
from autorad_jax.weights.prompt_learner import load_prompt_learner_state, prompt_learner_state
from autorad_jax.weights.torch_model import AutoRadLungTorch, ExportFolderError
from compiled import forward
from configs import autorad_lung

NUM_RADIOMICS = 7
FEATURES = tuple(f"original_feature_{i}" for i in range(NUM_RADIOMICS))


def build(variant: str = "tiny", **model):
    """(config, spec, random-init model)."""
    config = autorad_lung.get_config(variant)
    config.model.update(model)
    spec = modeling.resolve_spec(config, FEATURES)
    return config, spec, models.Model(config.model, spec, rngs=nnx.Rngs(0))


def inputs(config, batch: int, seed: int = 0):
    """Normalised NHWC images, raw radiomics (one non-finite value) and training statistics."""
    rng = np.random.default_rng(seed)
    size = config.data.image_size
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    stats = pipeline.RadiomicsStats.fit(rng.normal(5.0, 3.0, (100, NUM_RADIOMICS)))
    raw = rng.normal(5.0, 6.0, (batch, NUM_RADIOMICS)).astype(np.float32)
    raw[0, -1] = np.nan
    return images, raw, stats


def torch_logits(export_dir: str, images: np.ndarray, raw: np.ndarray) -> np.ndarray:
    model = AutoRadLungTorch.from_export(export_dir).eval()
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(raw)).numpy()


def assert_relative(actual, expected, rtol: float):
    """max |actual - expected| <= rtol * max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("model_kw,image_size", [
    (dict(name="autorad_lung", conditioning="shared", pooling="head"), None),
    # images larger than the towers were built for: JAX interpolates the position table, the export carries it
    (dict(name="autorad_lung", conditioning="per_token", pooling="mean", ctx_init=""), 84),
    (dict(name="coop"), None),
], ids=["autorad_lung", "per_token_mean_pool_larger_images", "coop"])
def test_tiny_export_gives_the_jax_logits_in_pytorch_and_back(tmp_path, model_kw, image_size):
    config, spec, model = build(**model_kw)
    if image_size:
        config.data.image_size = image_size
    images, raw, stats = inputs(config, batch=3)
    expected, _ = forward(model, images, stats.apply(raw))
    out = export.export_model(model, config, spec, stats, str(tmp_path))

    assert_relative(torch_logits(out, images, raw), expected, 1e-4)
    reloaded, export_config = export.load_export(out)
    np.testing.assert_allclose(forward(reloaded, images, stats.apply(raw))[0], expected, rtol=1e-6, atol=1e-6)
    assert export_config["radiomics"]["feature_names"] == list(FEATURES)
    assert export_config["class_names"] == list(config.model.class_names)
    assert export_config["preprocessing"]["image_size"] == config.data.image_size


def test_transformers_loads_the_exported_towers_and_reproduces_the_vision_tower(tmp_path):
    config, spec, model = build()
    images, raw, stats = inputs(config, batch=2)
    export.export_model(model, config, spec, stats, str(tmp_path))
    pixel_values = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    jax_vision = forward(model.aimv2.vision_model, images)

    for cls, folder in ((Aimv2Model, "aimv2"), (Aimv2VisionModel, "aimv2_vision")):
        hf, info = cls.from_pretrained(str(tmp_path / folder), output_loading_info=True)
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
        vision = hf.vision_model if cls is Aimv2Model else hf
        with torch.no_grad():
            got = vision.eval()(pixel_values=pixel_values)
        assert_relative(got.last_hidden_state.numpy(), jax_vision.last_hidden_state, 1e-5)
        assert_relative(got.pooler_output.numpy(), jax_vision.pooler_output, 1e-5)
    with torch.no_grad():
        features = Aimv2Model.from_pretrained(str(tmp_path / "aimv2")).get_image_features(pixel_values)
    assert_relative(features.pooler_output.numpy(), model.aimv2.get_image_features(images), 1e-5)


def test_large_towers_export_gives_the_jax_logits(tmp_path):
    """AIMv2-L's vision and AIMv2-LiT's text blocks (widths, heads, MLP, 224-pixel images, scanned layout), random init,
    batch 1; 4 of the 24 vision and 2 of the 12 text blocks, since the export is the same for every block (the towers
    at full depth are compared with transformers in test_aimv2.py)."""
    config, spec, model = build("large", vision=dict(num_hidden_layers=4), text=dict(num_hidden_layers=2))
    images, raw, stats = inputs(config, batch=1)
    expected, _ = forward(model, images, stats.apply(raw))
    export.export_model(model, config, spec, stats, str(tmp_path))
    del model
    assert_relative(torch_logits(str(tmp_path), images, raw), expected, 1e-4)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    config, spec, model = build()
    _, _, stats = inputs(config, batch=1)
    return export.export_model(model, config, spec, stats, str(tmp_path_factory.mktemp("export")))


@pytest.mark.parametrize("missing", ["autorad_lung.safetensors", "autorad_lung.json", "aimv2/model.safetensors"])
def test_incomplete_export_folder_names_the_missing_file(exported, tmp_path, missing):
    folder = shutil.copytree(exported, tmp_path / "export")
    os.remove(folder / missing)
    with pytest.raises(ExportFolderError, match=f"missing {missing}"):
        AutoRadLungTorch.from_export(str(folder))
    with pytest.raises(ExportFolderError, match=f"missing {missing}"):
        export.load_export(str(folder))


def test_version_one_export_reads_as_untransformed_radiomics_of_aimv2_and_a_newer_one_is_refused(exported, tmp_path):
    config, _, model = build()
    images, raw, stats = inputs(config, batch=1)  # the statistics of the `exported` fixture
    folder = shutil.copytree(exported, tmp_path / "export")
    with open(folder / "autorad_lung.json") as f:
        export_config = json.load(f)
    assert export_config["format_version"] == 3 and export_config["model"]["family"] == "aimv2"
    for key in ("condition_on", "family", "ctx_start"):
        del export_config["model"][key]
    for key in ("transform", "clip"):
        del export_config["radiomics"][key]
    with open(folder / "autorad_lung.json", "w") as f:
        json.dump({**export_config, "format_version": 1}, f)
    expected, _ = forward(model, images, stats.apply(raw))
    assert_relative(torch_logits(str(folder), images, raw), expected, 1e-4)
    with open(folder / "autorad_lung.json", "w") as f:
        json.dump({**export_config, "format_version": 4}, f)
    with pytest.raises(ExportFolderError, match="format_version 4, this version of autorad-jax reads 1 and 2 and 3"):
        AutoRadLungTorch.from_export(str(folder))


def test_export_folder_of_another_model_is_refused(exported, tmp_path):
    folder = shutil.copytree(exported, tmp_path / "export")
    # prompt-learner weights of a model with per-token conditioning (meta_net.linear2 n_ctx times wider)
    _, _, other = build(conditioning="per_token")
    save_file(prompt_learner_state(other.prompt_learner), str(folder / "autorad_lung.safetensors"))
    with pytest.raises(ExportFolderError, match="does not fit"):
        AutoRadLungTorch.from_export(str(folder))
    with pytest.raises(WeightsMismatchError, match="meta_net.linear2"):
        export.load_export(str(folder))
    # a JSON that is not an AutoRad-Lung export
    (folder / "autorad_lung.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ExportFolderError, match="not an AutoRad-Lung export"):
        AutoRadLungTorch.from_export(str(folder))


def test_towers_of_another_model_are_refused(exported, tmp_path):
    folder = shutil.copytree(exported, tmp_path / "export")
    _, _, other = build(text=dict(autorad_lung.get_config("tiny").model.text.to_dict(), num_hidden_layers=1))
    shutil.rmtree(folder / "aimv2")
    pretrained.save_pretrained(other.aimv2, str(folder / "aimv2"))
    config = json.loads((folder / "aimv2" / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 2  # config of the right model, weights of another
    (folder / "aimv2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportFolderError, match="do not match"):
        AutoRadLungTorch.from_export(str(folder))


def test_baselines_have_no_pytorch_export(tmp_path):
    config, spec, model = build(name="radiomics_logreg")
    _, _, stats = inputs(config, batch=1)
    with pytest.raises(ExportFolderError, match="'radiomics_logreg' model"):
        export.export_model(model, config, spec, stats, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_prompt_learner_map_round_trips(exported):
    weights = load_file(os.path.join(exported, "autorad_lung.safetensors"))
    _, _, model = build()
    load_prompt_learner_state(model.prompt_learner, weights, "exported")
    again = prompt_learner_state(model.prompt_learner)
    assert set(again) == set(weights)
    for key in weights:
        np.testing.assert_array_equal(again[key], weights[key])


def test_an_export_whose_prompts_were_embedded_with_another_table_is_refused_by_both_backends(exported, tmp_path):
    """As an export of a run from a pretrained folder made before the prompts took the folder's token table."""
    folder = shutil.copytree(exported, tmp_path / "export")
    weights = load_file(folder / "autorad_lung.safetensors")
    weights["token_suffix"] = weights["token_suffix"] + np.float32(1e-3)
    save_file(weights, folder / "autorad_lung.safetensors")
    for load in (AutoRadLungTorch.from_export, export.load_export):
        with pytest.raises(ExportFolderError, match="fixed token embeddings .* Train it again"):
            load(str(folder))


@pytest.mark.parametrize("damaged", ["autorad_lung.safetensors", "aimv2/model.safetensors"])
def test_truncated_weights_are_named_in_one_line_by_both_backends(exported, tmp_path, damaged):
    folder = shutil.copytree(exported, tmp_path / "export")
    path = folder / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for load in (AutoRadLungTorch.from_export, export.load_export):
        with pytest.raises((ExportFolderError, pretrained.PretrainedFolderError), match="truncated or corrupt") as e:
            load(str(folder))
        assert damaged.split("/")[-1] in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("image_size", [56, 20])
def test_pytorch_preprocessing_is_the_device_preprocessing(exported, image_size):
    """AutoRadLungTorch.preprocess does what autorad_jax.data.preprocess does, up- and downsampling."""
    model = AutoRadLungTorch.from_export(exported)
    model.config["preprocessing"]["image_size"] = image_size
    views = np.random.default_rng(4).integers(-1100, 600, (3, 32, 32, 3)).astype(np.int16)
    expected = preprocess.images(views, preprocess.Preprocessing(
        tuple(model.config["preprocessing"]["window_hu"]), image_size))
    got = model.preprocess(torch.from_numpy(views)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-5)
