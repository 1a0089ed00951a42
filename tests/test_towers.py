"""CLIP and SigLIP towers against transformers (random models of two shapes per family, saved locally): outputs,
both block layouts, exact round trips, vision-only folders and bad folders."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from autorad_jax import weights
from autorad_jax.models import clip, siglip

# family -> shape -> (config class, vision kwargs, text kwargs, joint kwargs); the shapes differ in depth, widths, patch
# grid, activation, (CLIP) the EOS rule: eos_token_id 2 pools at the highest token id, as the legacy configs, and
# (SigLIP) the text head's width.
SHAPES = {
    "clip": {
        "a": (transformers.CLIPConfig,
              dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                   patch_size=14),
              dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                   max_position_embeddings=12, eos_token_id=99),
              dict(projection_dim=16)),
        "b": (transformers.CLIPConfig,
              dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                   patch_size=8, hidden_act="gelu", layer_norm_eps=1e-6),
              dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                   max_position_embeddings=10, eos_token_id=2, hidden_act="gelu"),
              dict(projection_dim=24, logit_scale_init_value=3.0)),
    },
    "siglip": {
        "a": (transformers.SiglipConfig,
              dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                   patch_size=14),
              dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                   max_position_embeddings=12, projection_size=64),
              dict()),
        "b": (transformers.SiglipConfig,
              dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                   patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5),
              dict(hidden_size=48, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                   max_position_embeddings=10, projection_size=32, hidden_act="gelu"),
              dict()),
    },
}
CASES = [(family, shape) for family in SHAPES for shape in SHAPES[family]]
OURS = {"clip": clip.ClipModel, "siglip": siglip.SiglipModel}


def rel_err(ours, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def _inputs(family: str, shape: str):
    _, vision, text, _ = SHAPES[family][shape]
    rng = np.random.default_rng(1)
    size = vision["image_size"]
    pixels = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    length = text["max_position_embeddings"] - 2
    ids = rng.integers(3, 90, (3, length))
    mask = np.ones_like(ids)
    ids[0, 4], ids[1, length - 1], ids[2, 2] = 99, 99, 99  # EOS (the highest id too, for the legacy rule)
    mask[0, 5:] = 0  # right padding after the first row's EOS
    return pixels, ids, mask


def _hf_joint(family: str, shape: str):
    config_class, vision, text, joint = SHAPES[family][shape]
    config = config_class(vision_config=vision, text_config=text, **joint)
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial norms, biases and class/probe vectors
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _run_hf(model, pixels, ids, mask) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask))
    return {name: getattr(out, name).numpy() for name in ("logits_per_image", "image_embeds", "text_embeds")}


def _run_ours(model, pixels, ids, mask) -> dict[str, np.ndarray]:
    out = model(jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids), jnp.asarray(mask))
    return {name: np.asarray(out[name]) for name in ("logits_per_image", "image_embeds", "text_embeds")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(family, shape) -> (joint folder, transformers' outputs); and (family, 'vision') -> (vision-only folder,
    {image size: (images, its transformers outputs)}) for shape 'a' (28 px) and 42 px images (position embeddings
    interpolated)."""
    torch.manual_seed(0)
    result = {}
    for family, shape in CASES:
        model = _hf_joint(family, shape)
        path = tmp_path_factory.mktemp(f"{family}_{shape}")
        model.save_pretrained(path)
        result[family, shape] = (path, _run_hf(model, *_inputs(family, shape)))
        if shape == "a":
            vision = model.vision_model
            path = tmp_path_factory.mktemp(f"{family}_vision")
            vision.save_pretrained(path)
            pixels = _inputs(family, shape)[0]
            big = np.random.default_rng(2).standard_normal((2, 3, 42, 42)).astype(np.float32)  # a 3 x 3 patch grid
            with torch.no_grad():
                out = vision(pixel_values=torch.from_numpy(pixels))
                out_big = vision(pixel_values=torch.from_numpy(big), interpolate_pos_encoding=True)
            result[family, "vision"] = (path, {
                28: (pixels, {"last_hidden_state": out.last_hidden_state.numpy(),
                              "pooler_output": out.pooler_output.numpy()}),
                42: (big, {"last_hidden_state": out_big.last_hidden_state.numpy(),
                           "pooler_output": out_big.pooler_output.numpy()})})
    return result


@pytest.mark.parametrize("family, shape", CASES)
def test_joint_model_matches_transformers_in_both_layouts(folders, family, shape):
    path, ref = folders[family, shape]
    unrolled = weights.load_pretrained(path)
    scanned = weights.load_pretrained(path, scan_layers=True, scan_split=1)
    assert type(unrolled) is OURS[family] and type(scanned) is OURS[family]
    assert unrolled.vision_model.encoder.group_starts is None and scanned.vision_model.encoder.group_starts == (0, 1)
    inputs = _inputs(family, shape)
    ours, ours_scanned = _run_ours(unrolled, *inputs), _run_ours(scanned, *inputs)
    for name in ref:
        assert rel_err(ours[name], ref[name]) <= 1e-5, name
        assert rel_err(ours_scanned[name], ours[name]) <= 1e-6, name
    if shape == "a":
        bf16 = _run_ours(weights.load_pretrained(path, dtype=jnp.bfloat16), *inputs)
        assert rel_err(bf16["logits_per_image"], ref["logits_per_image"]) <= 3e-2
        # The prompt learner's path: token embeddings given, the ids still choosing the pooled position.
        pixels, ids, mask = (jnp.asarray(x) for x in inputs)
        table = unrolled.text_model.embeddings.token_embedding.embedding[...]
        text = unrolled.get_text_features(ids, mask, inputs_embeds=table[ids])
        image = unrolled.get_image_features(pixels.transpose(0, 2, 3, 1))
        assert rel_err(text / np.linalg.norm(text, axis=-1, keepdims=True), ref["text_embeds"]) <= 1e-5
        assert rel_err(image / np.linalg.norm(image, axis=-1, keepdims=True), ref["image_embeds"]) <= 1e-5


@pytest.mark.parametrize("family, shape", CASES)
def test_round_trip_to_transformers_is_exact(folders, family, shape, tmp_path):
    """Scanned blocks written back: the very tensors transformers saved, and a folder it loads with nothing missing,
    unexpected or mismatched."""
    path, ref = folders[family, shape]
    weights.save_pretrained(weights.load_pretrained(path, scan_layers=True), tmp_path)
    original, saved = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(original) == sorted(saved)
    for key in original:
        assert original[key].dtype == saved[key].dtype
        np.testing.assert_array_equal(original[key], saved[key], err_msg=key)
    reloaded, info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True,
                                                            attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(reloaded).__name__ == OURS[family].__name__.replace("Clip", "CLIP")
    again = _run_hf(reloaded.eval(), *_inputs(family, shape))
    for name in ref:
        np.testing.assert_array_equal(again[name], ref[name])


@pytest.mark.parametrize("family", SHAPES)
def test_vision_only_folders_load_as_vision_towers(folders, family, tmp_path):
    """A vision-only folder (also in transformers 4's layout, keys under vision_model.) gives the vision tower,
    whose outputs are transformers', at the checkpoint's image size and at another one (its position embeddings
    interpolated as transformers' interpolate_pos_encoding); it is written back exactly."""
    path, refs = folders[family, "vision"]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    save_file({f"vision_model.{k}": v for k, v in tensors.items()}, legacy / "model.safetensors")
    for folder in (path, legacy):
        model = weights.load_pretrained(folder)
        assert type(model).__name__ == OURS[family].__name__.replace("Model", "VisionModel")
        for size, (pixels, ref) in refs.items():
            out = model(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
            for name in ref:
                assert rel_err(out[name], ref[name]) <= 1e-5, (folder, size, name)
    weights.save_pretrained(model, tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert sorted(saved) == sorted(tensors)
    for key in tensors:
        np.testing.assert_array_equal(saved[key], tensors[key], err_msg=key)


def test_text_pooling_follows_the_eos_rule():
    """Pooled at the first EOS id, or (eos_token_id 2, the legacy configs) at the highest token id."""
    ids = jnp.asarray([[5, 7, 9, 3, 9], [4, 2, 8, 2, 1]])
    np.testing.assert_array_equal(clip.eos_positions(ids, 9), [2, 0])
    np.testing.assert_array_equal(clip.eos_positions(ids, 2), [2, 2])


def _write(folder, config: dict, tensors: dict) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))


def test_bad_folders_are_one_line_naming_the_folder(folders, tmp_path):
    path, _ = folders["clip", "a"]
    config = json.loads((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    cases = {
        "unsupported": ({**config, "model_type": "blip"}, tensors, "model_type 'blip' is not one of"),
        "activation": ({**config, "vision_config": {**config["vision_config"], "hidden_act": "relu6"}}, tensors,
                       "hidden_act must be one of"),
    }
    for name, (cfg, ts, message) in cases.items():
        _write(tmp_path / name, cfg, ts)
        with pytest.raises(weights.PretrainedFolderError, match=message) as e:
            weights.load_pretrained(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)

    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.PretrainedFolderError, match=f"no model.safetensors .* in {tmp_path / 'no_weights'}"):
        weights.load_pretrained(tmp_path / "no_weights")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text("[1, 2]")
    with pytest.raises(weights.PretrainedFolderError, match="config.json holds a JSON list, not an object"):
        weights.load_pretrained(tmp_path / "odd")
