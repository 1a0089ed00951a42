"""AIMv2 weight import/export against transformers folders (small configurations)."""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from autorad_jax.models import aimv2
from autorad_jax.weights import hf_aimv2, pretrained
from autorad_jax.weights import name_map as name_map_engine
from autorad_jax.weights.name_map import WeightsMismatchError

VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=56,
              patch_size=14, use_head=True, qkv_bias=True, mlp_bias=True)
TEXT = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
            max_position_embeddings=12, eos_token_id=99)
KINDS = ("vision", "text", "joint")


def rel_err(ours, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def _hf_model(kind: str):
    """transformers model with eager attention: its causal text mask is only applied reliably there (see aimv2.py)."""
    if kind == "vision":
        cls, config = transformers.Aimv2VisionModel, transformers.Aimv2VisionConfig(**VISION)
    elif kind == "text":
        cls, config = transformers.Aimv2TextModel, transformers.Aimv2TextConfig(**TEXT)
    else:
        cls = transformers.Aimv2Model
        config = transformers.Aimv2Config(vision_config=VISION, text_config=TEXT, projection_dim=16)
    return cls._from_config(config, attn_implementation="eager")


def _inputs(image_size: int = 56):
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((2, 3, image_size, image_size)).astype(np.float32)
    ids = np.array([[5, 6, 7, 99, 0, 0, 0, 0], [8, 9, 10, 11, 12, 13, 99, 4]])
    mask = np.ones_like(ids)  # all ones: every position is comparable
    return pixels, ids, mask


def _run_hf(model, kind: str, pixels, ids, mask) -> dict[str, np.ndarray]:
    with torch.no_grad():
        if kind == "vision":
            out = model(pixel_values=torch.from_numpy(pixels))
        elif kind == "text":
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        else:
            out = model(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                        attention_mask=torch.from_numpy(mask))
            return {"logits_per_image": out.logits_per_image.numpy()}
    return {"last_hidden_state": out.last_hidden_state.numpy(), "pooler_output": out.pooler_output.numpy()}


def _run_ours(model, kind: str, pixels, ids, mask) -> dict[str, np.ndarray]:
    nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    if kind == "vision":
        out = model(nhwc)
    elif kind == "text":
        out = model(jnp.asarray(ids), jnp.asarray(mask))
    else:
        return {"logits_per_image": np.asarray(model(nhwc, jnp.asarray(ids), jnp.asarray(mask)).logits_per_image)}
    return {"last_hidden_state": np.asarray(out.last_hidden_state, np.float32),
            "pooler_output": np.asarray(out.pooler_output, np.float32)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> (folder, transformers reference outputs) for random transformers models with non-trivial norms/biases."""
    torch.manual_seed(0)
    result = {}
    for kind in KINDS:
        model = _hf_model(kind).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        result[kind] = (path, _run_hf(model, kind, *_inputs()))
    return result


@pytest.mark.parametrize("kind", KINDS)
def test_load_matches_transformers(folders, kind):
    path, ref = folders[kind]
    model = pretrained.load_pretrained(path)
    expected = {"vision": aimv2.Aimv2VisionModel, "text": aimv2.Aimv2TextModel, "joint": aimv2.Aimv2Model}[kind]
    assert type(model) is expected
    ours = _run_ours(model, kind, *_inputs())
    for name in ref:
        assert rel_err(ours[name], ref[name]) <= 1e-5, name
    ours_bf16 = _run_ours(pretrained.load_pretrained(path, dtype=jnp.bfloat16), kind, *_inputs())
    for name in ref:
        assert rel_err(ours_bf16[name], ref[name]) <= 2e-2, name


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_and_transformers_reload(folders, kind, tmp_path):
    path, ref = folders[kind]
    model = pretrained.load_pretrained(path)
    pretrained.save_pretrained(model, tmp_path)

    # Bit-identical parameters after load -> save -> load, and the same tensors as the original folder.
    again = pretrained.load_pretrained(tmp_path)
    for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
        assert p1 == p2 and v1.dtype == v2.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(v1[...]), np.asarray(v2[...]), err_msg=str(p1))
    original, saved = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(original) == sorted(saved)
    for key in original:
        np.testing.assert_array_equal(original[key], saved[key], err_msg=key)

    # transformers loads our folder with nothing missing, unexpected or mismatched, and computes the same outputs.
    cls = type(_hf_model(kind))
    reloaded, info = cls.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    again_ref = _run_hf(reloaded.eval(), kind, *_inputs())
    for name in ref:
        np.testing.assert_array_equal(again_ref[name], ref[name])


def test_non_native_image_size_matches_reference_interpolation(folders, tmp_path):
    """84 px on a 56 px checkpoint: grid 4x4 -> 6x6, bicubic as torch.nn.functional.interpolate(align_corners=False)."""
    path, _ = folders["vision"]
    model = pretrained.load_pretrained(path)
    table = np.array(model.embeddings.position_embedding.embedding[...])
    d = table.shape[-1]

    def torch_resize(size):
        grid = torch.from_numpy(table).reshape(1, 4, 4, d).permute(0, 3, 1, 2)
        out = torch.nn.functional.interpolate(grid, size=size, mode="bicubic", align_corners=False)
        return out.permute(0, 2, 3, 1).reshape(-1, d).numpy()

    for size in [(6, 6), (3, 5), (8, 2), (4, 4)]:
        ours = aimv2.interpolate_position_embedding(jnp.asarray(table), (4, 4), size)
        np.testing.assert_allclose(np.asarray(ours), torch_resize(size), rtol=0, atol=1e-6 * np.abs(table).max())

    # End to end: transformers at 84 px with the reference-interpolated table == ours at 84 px on the 56 px weights.
    hf = transformers.Aimv2VisionModel.from_pretrained(path, image_size=84, ignore_mismatched_sizes=True).eval()
    with torch.no_grad():
        hf.embeddings.position_embedding.weight.copy_(torch.from_numpy(torch_resize((6, 6))))
    pixels = _inputs(84)[0]
    ref = _run_hf(hf, "vision", pixels, None, None)
    ours = _run_ours(model, "vision", pixels, None, None)
    assert ours["last_hidden_state"].shape == (2, 36, 64)
    for name in ref:
        assert rel_err(ours[name], ref[name]) <= 1e-5, name


def _write(path, config: dict, tensors: dict) -> None:
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_bad_folders_fail_with_names(folders, tmp_path):
    path, _ = folders["vision"]
    config = json.loads((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")

    with pytest.raises(pretrained.PretrainedFolderError, match="config.json does not exist"):
        pretrained.load_pretrained(tmp_path)
    with pytest.raises(pretrained.PretrainedFolderError, match=re.escape(f"{path / 'model.safetensors'} is a file: "
                       f"give the folder that holds it, config.json and the weights ({path}?)")):
        pretrained.load_pretrained(path / "model.safetensors")
    snapshot = tmp_path / "models--apple--aimv2" / "snapshots" / "0123abcd"
    shutil.copytree(path, snapshot)
    with pytest.raises(pretrained.PretrainedFolderError, match=re.escape(
            f"{snapshot.parent.parent} is a Hugging Face cache folder, not a model folder: give one of its "
            f"snapshots ({snapshot}).")):
        pretrained.load_pretrained(snapshot.parent.parent)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(pretrained.PretrainedFolderError, match="no model.safetensors"):
        pretrained.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config)[:40])
    with pytest.raises(pretrained.PretrainedFolderError, match="config.json is not valid JSON"):
        pretrained.load_pretrained(tmp_path)

    _write(tmp_path / "type", {**config, "model_type": "dinov2"}, tensors)
    with pytest.raises(pretrained.PretrainedFolderError, match="model_type 'dinov2' is not one of"):
        pretrained.load_pretrained(tmp_path / "type")

    missing = dict(tensors)
    del missing["encoder.layers.1.ffn.up_proj.weight"]
    _write(tmp_path / "missing", config, missing)
    with pytest.raises(WeightsMismatchError, match=r"missing \['encoder.layers.1.ffn.up_proj.weight'\]"):
        pretrained.load_pretrained(tmp_path / "missing")

    _write(tmp_path / "extra", config, {**tensors, "head.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsMismatchError, match=r"unexpected \['head.extra.weight'\]"):
        pretrained.load_pretrained(tmp_path / "extra")

    misshapen = {**tensors, "head.k_proj.weight": np.zeros((64, 32), np.float32)}
    _write(tmp_path / "shape", config, misshapen)
    with pytest.raises(WeightsMismatchError, match=r"head.k_proj.weight has shape \(64, 32\)"):
        pretrained.load_pretrained(tmp_path / "shape")

    truncated = (tmp_path / "shape" / "model.safetensors").read_bytes()
    (tmp_path / "shape" / "model.safetensors").write_bytes(truncated[: len(truncated) // 2])
    with pytest.raises(pretrained.PretrainedFolderError, match="model.safetensors is not a readable safetensors file"):
        pretrained.load_pretrained(tmp_path / "shape")


def test_name_map_covers_every_parameter_once():
    config = aimv2.Aimv2Config(vision_config=aimv2.Aimv2VisionConfig(**VISION), text_config=aimv2.Aimv2TextConfig(**TEXT),
                               projection_dim=16)
    model = aimv2.Aimv2Model(config, rngs=nnx.Rngs(0))
    mapping = hf_aimv2.FAMILY.name_map(config)
    paths = [path for path, _ in mapping.values()]
    assert len(paths) == len(set(paths))
    assert set(paths) == {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    state = pretrained.nnx_to_hf_state(model)
    assert all(isinstance(v, np.ndarray) for v in state.values()) and state["logit_scale"].shape == ()
    assert jax.tree.structure(state) == jax.tree.structure(dict.fromkeys(mapping, 0))


def test_public_import_in_a_fresh_interpreter():
    """The documented entry point imports first, on its own (no import cycle through autorad_jax.models)."""
    code = "from autorad_jax.weights import load_pretrained, save_pretrained"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("kind", KINDS)
def test_scanned_layout_matches_transformers_and_round_trips(folders, kind, tmp_path):
    """Scanned blocks (the vision stack split in two groups at block 1) load transformers' per-layer weights, compute
    its outputs, and write back the very tensors they read."""
    path, ref = folders[kind]
    kwargs = dict(scan_layers=True) if kind == "text" else dict(scan_layers=True, scan_split=1)
    model = pretrained.load_pretrained(path, **kwargs)
    vision = {"vision": model, "text": None, "joint": getattr(model, "vision_model", None)}[kind]
    if vision is not None:
        assert vision.encoder.layers["0"].ffn.up_proj.kernel.shape == (1, 64, 96)
        assert vision.encoder.layers["1"].ffn.up_proj.kernel.shape == (1, 64, 96)
    ours = _run_ours(model, kind, *_inputs())
    for name in ref:
        assert rel_err(ours[name], ref[name]) <= 1e-5, name

    pretrained.save_pretrained(model, tmp_path)
    original, saved = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(original) == sorted(saved)
    for key in original:
        np.testing.assert_array_equal(original[key], saved[key], err_msg=key)
    again = pretrained.load_pretrained(tmp_path, **kwargs)
    for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
        assert p1 == p2
        np.testing.assert_array_equal(np.asarray(v1[...]), np.asarray(v2[...]), err_msg=str(p1))


def test_scanned_name_map_fills_every_row_once():
    """Each stacked parameter takes one transformers key per row; a map that misses a row is refused."""
    config = aimv2.Aimv2VisionConfig(**VISION)
    model = aimv2.Aimv2VisionModel(config, rngs=nnx.Rngs(0), scan_layers=True)
    mapping = hf_aimv2.FAMILY.name_map(config, vision_starts=(0,))
    assert mapping["encoder.layers.1.ffn.up_proj.weight"][0] == ("encoder", "layers", "0", "ffn", "up_proj", "kernel")
    assert mapping["encoder.layers.1.ffn.up_proj.weight"][2] == 1
    state = pretrained.nnx_to_hf_state(model)
    kernel = np.asarray(model.encoder.layers["0"].ffn.up_proj.kernel[...])
    np.testing.assert_array_equal(state["encoder.layers.1.ffn.up_proj.weight"], kernel[1].T)
    del mapping["encoder.layers.1.ffn.up_proj.weight"]
    with pytest.raises(WeightsMismatchError, match=r"up_proj/kernel with rows \[0\]"):
        name_map_engine.dump(name_map_engine.variables(model), mapping, "vision")
