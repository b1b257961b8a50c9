"""The real CLIP tokenizer, written offline from the BPE vocabulary that ``open_clip`` ships.

Stable Diffusion 1.x uses OpenAI CLIP's tokenizer. No hub is reachable here, but ``open_clip`` carries the
same byte-level BPE table (``bpe_simple_vocab_16e6.txt.gz``); rebuilding ``vocab.json`` and ``merges.txt``
from it the way ``open_clip.tokenizer.SimpleTokenizer`` does gives a transformers ``CLIPTokenizer`` whose ids
equal open_clip's (and OpenAI's). Only the special tokens are renamed: open_clip calls them
``<start_of_text>`` / ``<end_of_text>``, transformers ``<|startoftext|>`` / ``<|endoftext|>`` (ids 49406 /
49407). Stable Diffusion pads with ``<|endoftext|>`` to 77 tokens.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408
_NUM_MERGES = 49152 - 256 - 2  # as in CLIP / open_clip: lines[1 : 49152 - 256 - 2 + 1] of the BPE file


def _bpe_path() -> Path:
    # Locate the package without importing it: importing open_clip pulls in torch, timm and more (seconds).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip (pip install open_clip_torch) is needed for its CLIP BPE vocabulary")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE vocabulary is missing: {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map (same order as open_clip / GPT-2)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clip_vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    """The token -> id map and the ranked merge list ("a b" strings) of CLIP's tokenizer."""
    lines = gzip.open(bpe_path or _bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    if len(merges) != _NUM_MERGES:
        raise ValueError(f"expected {_NUM_MERGES} BPE merges, found {len(merges)}")
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"expected {VOCAB_SIZE} distinct tokens, found {len(vocab)}")
    return vocab, merges


def write_clip_tokenizer(out_dir: str | Path, pad_token: str = EOS_TOKEN) -> None:
    """Write a ``CLIPTokenizer`` folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json).

    ``pad_token``: SD 1.x pads with ``<|endoftext|>``; SD 2.x (OpenCLIP's tokenizer) pads with ``!`` (id 0).

    The folder appears atomically: files are written to a temporary sibling folder that is then renamed
    into place. An existing ``out_dir`` is replaced.
    """
    from core.safe_files import atomic_directory  # imports torch, which this module's import avoids

    vocab, merges = clip_vocab_and_merges()
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        **special,
    }
    with atomic_directory(out_dir) as tmp:
        with open(tmp / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(tmp / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.write("\n".join(merges) + "\n")
        with open(tmp / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(tmp / "special_tokens_map.json", "w", encoding="utf-8") as f:
            json.dump(special, f, indent=2)
