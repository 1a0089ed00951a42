"""CLIP tokenizer derived from the packaged CLIP BPE file: vocabulary and ids as CLIP's own tokenizer gives them."""

import json

import numpy as np
import pytest

from autorad_jax.data import tokenizer as tk


@pytest.fixture(scope="module")
def derived_dir(tmp_path_factory):
    return tk.derive_vocab_files(tk.find_bpe_file(), tmp_path_factory.mktemp("clip_bpe"))


@pytest.fixture(scope="module")
def tokenizer(derived_dir):
    return tk.load_tokenizer(cache_dir=str(derived_dir))


def test_derived_vocabulary_has_clip_layout(derived_dir):
    vocab = json.loads((derived_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    merges = (derived_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) - 1 == 49408 - 512 - 2


def test_ids_match_clip(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a")["input_ids"] == [49406, 320, 1125, 539, 320, 49407]
    assert tokenizer("malignant", add_special_tokens=False)["input_ids"] == [41122, 773]
    assert tokenizer("lung", add_special_tokens=False)["input_ids"] == [16271]
    assert tk.count_tokens(tokenizer, "lung") == 1


def test_tokenize_prompts_pads_and_finds_eos(tokenizer):
    out = tk.tokenize_prompts(tokenizer, ["a photo of a", "lung"], context_length=8)
    assert out.input_ids.dtype == np.int32 and out.input_ids.shape == (2, 8)
    np.testing.assert_array_equal(out.input_ids[0], [49406, 320, 1125, 539, 320, 49407, 49407, 49407])
    np.testing.assert_array_equal(out.input_ids[1, :3], [49406, 16271, 49407])
    np.testing.assert_array_equal(out.eos_index, [5, 2])
    with pytest.raises(ValueError, match="longer than 4"):
        tk.tokenize_prompts(tokenizer, ["a photo of a"], context_length=4)


def test_checkpoint_tokenizer_files_take_precedence(tokenizer, tmp_path):
    assert tk.load_tokenizer(str(tmp_path), cache_dir=str(tmp_path / "cache")).vocab_size == 49408  # no files: derived
    checkpoint = tmp_path / "checkpoint"
    tokenizer.save_pretrained(str(checkpoint))
    loaded = tk.load_tokenizer(str(checkpoint), cache_dir=str(tmp_path / "unused"))
    assert not (tmp_path / "unused").exists()
    assert loaded("a photo of a malignant lung")["input_ids"] == tokenizer("a photo of a malignant lung")["input_ids"]
