"""Pivotal tuning: new tokens (``<s0> <s1>``) in the tokenizer, their embeddings trained, Lightning-free.

The subject's identifier (``data.identifier``, e.g. ``sks``) stays what the user writes in prompts, captions and
templates; before the text encoder sees a prompt, each occurrence of it as a word becomes the new tokens
(:func:`expand_identifier`), the way diffusers' advanced DreamBooth script replaces its token abstraction. The tokens
get rows of their own in the token embedding (:class:`NewTokenEmbedding`): the base table stays frozen (and in its
dtype), only the new rows train, and only they are saved.

With several text encoders (SDXL's two), each tokenizer gets the tokens and each encoder rows of its own.

The export (:func:`embedding_file_state`) is a textual-inversion embedding: one (k, D) tensor per text encoder under
the family's key (``emb_params``; SDXL ``clip_l`` (k, 768) and ``clip_g`` (k, 1280)), the layout AUTOMATIC1111 and
ComfyUI load (the file's name is the word that calls it in their prompts), and that diffusers'
``load_textual_inversion`` reads with ``token=[...]`` given (for SDXL once per key, with that encoder and tokenizer).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import ConfigError, InputFileError

EMBEDDINGS_NAME = "embeddings.safetensors"


def check_new_tokens(tokens: list[str] | None) -> None:
    """Refuse token lists no tokenizer can take as whole new tokens."""
    if tokens is None:
        return
    if not tokens:
        raise ConfigError("data.new_tokens is an empty list: give the new tokens (e.g. [<s0>, <s1>]) or null for off.")
    for token in tokens:
        if not token or token != token.strip() or " " in token:
            raise ConfigError(f"data.new_tokens: {token!r} is no single word (no spaces; e.g. <s0>).")
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"data.new_tokens {tokens} names a token twice.")


def expand_identifier(prompt: str, identifier: str, tokens: list[str] | None) -> str:
    """``prompt`` with each whole-word ``identifier`` replaced by the new tokens (``sks`` -> ``<s0><s1>``)."""
    if not tokens:
        return prompt
    return re.sub(rf"(?<!\S){re.escape(identifier)}(?!\S)", "".join(tokens), prompt)


class NewTokenEmbedding(nn.Module):
    """A token embedding with ``k`` new rows after the ``V`` rows of ``base``: ids ``V .. V+k-1`` look up ``new``.

    ``base`` is frozen and kept as it is (its dtype, its memory: no (V + k, D) copy is made); ``new`` (k, D) is float32
    and trains. ``weight`` is the base table's, for code that asks an embedding for its dtype or device.
    """

    def __init__(self, base: nn.Embedding, new: Tensor) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.new = nn.Parameter(new.detach().float().clone())

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.new.shape[0]

    def forward(self, input_ids: Tensor) -> Tensor:
        vocab = self.base.num_embeddings
        is_new = input_ids >= vocab  # (B, L)
        out = self.base(input_ids.clamp_max(vocab - 1))  # (B, L, D)
        if not bool(is_new.any()):
            return out
        new = F.embedding((input_ids - vocab).clamp_min(0), self.new).to(out.dtype)  # (B, L, D)
        return torch.where(is_new.unsqueeze(-1), new, out)


def add_new_tokens(
    tokenizer, text_encoder: nn.Module, tokens: list[str], init_word: str | None = None
) -> NewTokenEmbedding:
    """Add ``tokens`` to ``tokenizer`` and rows for them to ``text_encoder``'s token embedding, in place.

    Each new row starts as the mean embedding of ``init_word``'s tokens (e.g. the class noun), or, for None, as a
    random draw with the table's mean and standard deviation (from torch's global generator: seeded by the run's seed).
    Returns the text encoder's new input embedding.
    """
    check_new_tokens(tokens)
    base = text_encoder.get_input_embeddings()
    if isinstance(base, NewTokenEmbedding):
        raise RuntimeError("new tokens are already added to this text encoder")
    vocab = base.num_embeddings
    vocabulary = tokenizer.get_vocab()
    known = [t for t in tokens if t in vocabulary or len(tokenizer(t, add_special_tokens=False).input_ids) == 1]
    if known:
        raise ConfigError(
            f"data.new_tokens {known} are already words of the tokenizer: choose tokens it does not know (e.g. <s0>)."
        )
    if len(tokenizer) != vocab:
        raise ConfigError(
            f"The tokenizer has {len(tokenizer)} tokens and the text encoder's embedding {vocab} rows: new tokens "
            "need them equal (a base model with added tokens already?)."
        )
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(vocab, vocab + len(tokens))):
        raise RuntimeError(f"the tokenizer gave the new tokens ids {ids}, not {vocab}..{vocab + len(tokens) - 1}")
    table = base.weight.detach().float()  # (V, D)
    if init_word:
        word_ids = tokenizer(init_word, add_special_tokens=False).input_ids
        if not word_ids:
            raise ConfigError(f"model.new_token_init {init_word!r} has no tokens: give a word, e.g. the class noun.")
        start = table[word_ids].mean(dim=0, keepdim=True).expand(len(tokens), -1)  # (k, D)
    else:
        start = table.mean(dim=0) + table.std(dim=0) * torch.randn(len(tokens), table.shape[1])  # (k, D)
    module = NewTokenEmbedding(base, start)
    text_encoder.set_input_embeddings(module)
    return module


def embedding_file_state(modules: list[NewTokenEmbedding], keys: tuple[str, ...]) -> dict[str, Tensor]:
    """What the export writes: each text encoder's new vectors (k, D) under its key (the family's
    ``embedding_keys``)."""
    if len(modules) != len(keys):
        raise ValueError(f"{len(modules)} new-token embeddings for the {len(keys)} keys {keys}")
    return {key: m.new.detach().float().cpu().contiguous() for key, m in zip(keys, modules, strict=True)}


def load_embedding_file(modules: list[NewTokenEmbedding], path: str | Path, keys: tuple[str, ...]) -> None:
    """Set each text encoder's new rows from an export's embedding file (frozen afterwards: rendering)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / EMBEDDINGS_NAME
    if not path.is_file():
        raise InputFileError(
            f"{str(path)!r} does not exist: data.new_tokens is set, so the export's new-token embeddings "
            f"({EMBEDDINGS_NAME}, written beside the LoRA file by a run with data.new_tokens) are needed to render."
        )
    state = load_file(str(path))
    for key, module in zip(keys, modules, strict=True):
        vectors = state.get(key)
        if vectors is None or tuple(vectors.shape) != tuple(module.new.shape):
            shape = None if vectors is None else tuple(vectors.shape)
            raise InputFileError(
                f"{str(path)!r} holds no {key} of shape {tuple(module.new.shape)} (found {shape}): was it made "
                "with as many data.new_tokens and this base model?"
            )
    for key, module in zip(keys, modules, strict=True):
        with torch.no_grad():
            module.new.copy_(state[key])
        module.new.requires_grad_(False)
