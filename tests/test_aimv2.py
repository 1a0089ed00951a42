"""AIMv2 towers against transformers' PyTorch implementation at full size (aimv2-large-patch14-224[-lit])."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx

from autorad_jax.models import aimv2
from autorad_jax.weights import load_pretrained
from compiled import forward

TEXT_LEN = 16


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| (printed, visible with pytest -s)."""
    ref = np.asarray(ref, np.float64)
    err = float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())
    print(f"relative error {err:.2e} for shape {ref.shape}")
    return err


def _perturb_small_params(model: torch.nn.Module) -> None:
    """Random init leaves norms at 1 and biases at 0; make them random too so the test can see them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or name.endswith("cls_token"):
                p.add_(0.1 * torch.randn_like(p))


@pytest.fixture(scope="module")
def lit(tmp_path_factory):
    """A random aimv2-large-patch14-224-lit model (default transformers config), its folder, inputs and outputs."""
    torch.manual_seed(0)
    ref = transformers.Aimv2Model._from_config(transformers.Aimv2Config(), attn_implementation="eager").eval()
    _perturb_small_params(ref)
    path = tmp_path_factory.mktemp("lit")
    ref.save_pretrained(path)

    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    ids = rng.integers(1, 49000, (2, TEXT_LEN))
    ids[0, 9], ids[1, 5:7] = ref.config.text_config.eos_token_id, ref.config.text_config.eos_token_id
    mask = np.ones_like(ids)
    mask[0, 10:] = 0  # right padding after the first EOS
    with torch.no_grad():
        out = ref(pixel_values=torch.from_numpy(pixels), input_ids=torch.from_numpy(ids),
                  attention_mask=torch.from_numpy(mask))
    ref_out = {
        "vision_last": out.vision_model_output.last_hidden_state.numpy(),
        "vision_pooled": out.vision_model_output.pooler_output.numpy(),
        "text_last": out.text_model_output.last_hidden_state.numpy(),
        "text_pooled": out.text_model_output.pooler_output.numpy(),
        "logits_per_image": out.logits_per_image.numpy(),
    }
    vision_state = {k[len("vision_model."):]: v for k, v in ref.state_dict().items()
                    if k.startswith("vision_model.") and not k.startswith("vision_model.head.")}
    del ref
    inputs = dict(pixel_values=jnp.asarray(pixels.transpose(0, 2, 3, 1)), input_ids=jnp.asarray(ids),
                  attention_mask=jnp.asarray(mask))
    return dict(path=path, inputs=inputs, ref=ref_out, vision_state=vision_state)


@pytest.fixture(scope="module")
def lit_model(lit):
    model = load_pretrained(lit["path"])
    assert isinstance(model, aimv2.Aimv2Model)
    return model


@pytest.fixture(scope="module")
def lit_out(lit, lit_model):
    return forward(lit_model, **lit["inputs"])


def test_lit_vision_parity(lit, lit_out):
    assert lit_out.vision_model_output.last_hidden_state.shape == (1, 256, 1024)
    assert rel_err(lit_out.vision_model_output.last_hidden_state, lit["ref"]["vision_last"]) <= 1e-5
    assert rel_err(lit_out.vision_model_output.pooler_output, lit["ref"]["vision_pooled"]) <= 1e-5


def test_lit_text_parity(lit, lit_out):
    # The reference is causal: eager attention with an attention_mask (see aimv2.py). Padded query rows not compared.
    valid = np.asarray(lit["inputs"]["attention_mask"], bool)
    ours = np.asarray(lit_out.text_model_output.last_hidden_state)
    assert rel_err(ours[valid], lit["ref"]["text_last"][valid]) <= 1e-5
    assert rel_err(lit_out.text_model_output.pooler_output, lit["ref"]["text_pooled"]) <= 1e-5


def test_lit_joint_logits_parity(lit, lit_out):
    assert lit_out["logits_per_image"].shape == (1, 2)
    assert rel_err(lit_out.logits_per_image, lit["ref"]["logits_per_image"]) <= 1e-5
    np.testing.assert_array_equal(lit_out.logits_per_text, lit_out.logits_per_image.T)


def test_lit_bfloat16_close_to_float32_reference(lit, lit_model):
    # The same float32 parameters under a bfloat16-compute graph (load_pretrained(dtype=...) is tested small).
    bf16 = nnx.eval_shape(lambda: aimv2.Aimv2Model(lit_model.config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    model = nnx.merge(nnx.graphdef(bf16), nnx.state(lit_model))
    out = model(**lit["inputs"])
    assert out.vision_model_output.last_hidden_state.dtype == jnp.bfloat16
    for ours, ref in [(out.vision_model_output.last_hidden_state, "vision_last"),
                      (out.vision_model_output.pooler_output, "vision_pooled"),
                      (out.text_model_output.pooler_output, "text_pooled"),
                      (out.logits_per_image, "logits_per_image")]:
        assert rel_err(ours.astype(jnp.float32), lit["ref"][ref]) <= 2e-2, ref


def test_large_vision_without_head_parity(lit, tmp_path):
    """aimv2-large-patch14-224 (use_head False): a vision-only folder holding the LiT vision weights minus the head.

    transformers' vision last_hidden_state does not depend on the head, so the LiT reference output is the reference
    here; transformers has no pooled output without the head, ours is the token mean.
    """
    transformers.Aimv2VisionConfig(use_head=False).save_pretrained(tmp_path)
    safetensors.torch.save_file(lit["vision_state"], tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "aimv2_vision_model"

    model = load_pretrained(tmp_path)
    assert isinstance(model, aimv2.Aimv2VisionModel) and model.head is None
    out = model(lit["inputs"]["pixel_values"])
    assert rel_err(out.last_hidden_state, lit["ref"]["vision_last"]) <= 1e-5
    assert rel_err(out.pooler_output, lit["ref"]["vision_last"].mean(axis=1)) <= 1e-5
