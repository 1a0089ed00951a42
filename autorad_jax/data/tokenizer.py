"""Prompt tokenisation with each tower family's tokenizer: CLIP's BPE vocabulary (CLIP and the AIMv2-LiT text tower)
or SigLIP's SentencePiece model.

A pretrained folder's tokenizer is read from its files (`folder_tokenizer`: `vocab.json`/`merges.txt` or
`tokenizer.json` for `transformers.CLIPTokenizer`, `spiece.model` for `SiglipTokenizer`). Random-init towers, and AIMv2
folders without tokenizer files, take CLIP's BPE vocabulary (`load_tokenizer()`): a `vocab.json`/`merges.txt` pair
derived once from CLIP's BPE merges file, which this package ships beside this module (`bpe_simple_vocab_16e6.txt.gz`,
MIT, OpenAI), exactly as CLIP's `SimpleTokenizer` builds its vocabulary. `transformers`' tokenizers need no PyTorch, so
prompts tokenise in the core install.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

import numpy as np

from autorad_jax.errors import AutoradError

if TYPE_CHECKING:  # transformers takes seconds to import; only building prompts needs it, not loading a model
    from transformers import CLIPTokenizer, PreTrainedTokenizerBase

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
EOT_TOKEN_ID = VOCAB_SIZE - 1  # `<|endoftext|>`, the last vocabulary entry (the text tower pools at it)
SOT_TOKEN_ID = VOCAB_SIZE - 2
_NUM_MERGES = 49152 - 256 - 2  # CLIP's SimpleTokenizer keeps merges lines [1, 48895).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def find_bpe_file() -> Path:
    """Path of CLIP's `bpe_simple_vocab_16e6.txt.gz`, shipped with this package."""
    return Path(__file__).with_name(BPE_FILE)


def derive_vocab_files(bpe_path: Path | str, out_dir: Path | str) -> Path:
    """Writes `vocab.json` and `merges.txt` (transformers' CLIP format) derived from CLIP's BPE file into `out_dir`.

    Vocabulary order as CLIP's SimpleTokenizer: the 256 byte characters, the same with `</w>`, one entry per merge,
    then `<|startoftext|>` and `<|endoftext|>` (49408 entries). Files are written atomically; returns `out_dir`.
    """
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [SOT_TOKEN, EOT_TOKEN]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    _write_atomic(out_dir / "vocab.json", json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    return out_dir


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/autorad_jax/clip_bpe` (default `~/.cache/autorad_jax/clip_bpe`)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "autorad_jax" / "clip_bpe"


def load_tokenizer(checkpoint_dir: Optional[str] = None, cache_dir: Optional[str] = None) -> CLIPTokenizer:
    """CLIP tokenizer of `checkpoint_dir` when it holds tokenizer files, else the one derived from CLIP's BPE file.

    The derived `vocab.json`/`merges.txt` are cached in `cache_dir` (default: `default_cache_dir()`).
    """
    from transformers import CLIPTokenizer
    if checkpoint_dir and any((Path(checkpoint_dir) / name).is_file() for name in _TOKENIZER_FILES):
        return CLIPTokenizer.from_pretrained(checkpoint_dir)
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        derive_vocab_files(find_bpe_file(), folder)
    return CLIPTokenizer.from_pretrained(str(folder))


class TokenizerFilesError(AutoradError, FileNotFoundError):
    """A pretrained folder lacks the tokenizer files of its tower family."""


def folder_tokenizer(folder: str, tokenizer_class: str, file_sets: Sequence[Sequence[str]], *,
                     bpe_fallback: bool = False) -> PreTrainedTokenizerBase:
    """The `transformers` tokenizer `tokenizer_class` of a pretrained folder, which must hold one of `file_sets`; with
    `bpe_fallback`, a folder without any tokenizer file takes CLIP's BPE vocabulary (`load_tokenizer()`)."""
    import transformers
    present = lambda names: all((Path(folder) / name).is_file() for name in names)
    if not any(present(names) for names in file_sets):
        if bpe_fallback and not any((Path(folder) / n).is_file() for names in file_sets for n in names):
            return load_tokenizer()
        wanted = " or ".join(" and ".join(names) for names in file_sets)
        raise TokenizerFilesError(f"{folder} has no {tokenizer_class} tokenizer files: missing {wanted} (save the "
                                  f"model's tokenizer into the folder with save_pretrained).")
    return getattr(transformers, tokenizer_class).from_pretrained(folder)


class TokenizedPrompts(NamedTuple):
    """`input_ids` [N, context_length] int32 (SOS ... EOS, then padding); `eos_index` [N] position of the first EOS."""

    input_ids: np.ndarray
    eos_index: np.ndarray


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], context_length: int) -> TokenizedPrompts:
    """Tokenises `texts` with SOS/EOS, padded to `context_length` with the tokenizer's pad token.

    Raises ValueError when a text does not fit (truncating would drop its EOS, where the text tower pools).
    """
    rows = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    too_long = [t for t, r in zip(texts, rows) if len(r) > context_length]
    if too_long:
        raise ValueError(f"prompts longer than {context_length} tokens: {too_long}")
    pad = tokenizer.pad_token_id
    ids = np.array([r + [pad] * (context_length - len(r)) for r in rows], np.int32)
    eos_index = np.array([r.index(tokenizer.eos_token_id) for r in rows], np.int32)
    return TokenizedPrompts(ids, eos_index)


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Number of tokens of `text` without SOS/EOS."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
