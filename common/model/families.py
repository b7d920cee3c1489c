"""Tiny random-initialised models of the common causal-LM families, written as ordinary HF folders.

Nothing downloads: each family's architecture comes from its `transformers` config class at a toy
size, and the tokenizer is the embedded model's (trained on fedsov's public corpus), dressed in the
family's padding convention. Tests and benchmarks use these folders to show that fedsov trains what
users bring, not only its own GPT-2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import ModelError


@dataclass(frozen=True)
class Shape:
    """Size of a model, named once for every family (each config class spells these differently)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # fewer than heads: grouped-query attention where the family has it
    intermediate: int = 128
    context: int = 256
    window: int = 16  # sliding-window attention span, short enough that training sequences exceed it


@dataclass(frozen=True)
class TokenIds:
    bos: int
    eos: int
    pad: int | None


@dataclass(frozen=True)
class Family:
    name: str
    # How the family's released tokenizers pad: "eos" (pad is EOS), "none" (no pad token: Llama,
    # Mistral, Phi-3, GPT-NeoX) or "own" (a separate <pad> token: Gemma).
    padding: str
    config: Callable[[Shape, int, TokenIds], object]
    features: str  # what the architecture brings that the embedded GPT-2 does not


def _gpt2(s: Shape, vocab: int, ids: TokenIds):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab,
        n_positions=s.context,
        n_embd=s.hidden,
        n_layer=s.layers,
        n_head=s.heads,
        n_inner=s.intermediate,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
    )


def _common(s: Shape, vocab: int, ids: TokenIds) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        intermediate_size=s.intermediate,
        max_position_embeddings=s.context,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
    )


def _llama(s: Shape, vocab: int, ids: TokenIds):
    from transformers import LlamaConfig

    return LlamaConfig(**_common(s, vocab, ids), num_key_value_heads=s.kv_heads, tie_word_embeddings=False)


def _mistral(s: Shape, vocab: int, ids: TokenIds):
    from transformers import MistralConfig

    return MistralConfig(
        **_common(s, vocab, ids),
        num_key_value_heads=s.kv_heads,
        sliding_window=s.window,
        head_dim=s.hidden // s.heads,
        tie_word_embeddings=False,
    )


def _qwen2(s: Shape, vocab: int, ids: TokenIds):
    from transformers import Qwen2Config

    # Small Qwen2 checkpoints tie the output layer to the input embeddings.
    return Qwen2Config(**_common(s, vocab, ids), num_key_value_heads=s.kv_heads, tie_word_embeddings=True)


def _gemma3(s: Shape, vocab: int, ids: TokenIds):
    from transformers import Gemma3TextConfig

    head = s.hidden // s.heads
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(s.layers)]
    return Gemma3TextConfig(
        **_common(s, vocab, ids),
        num_key_value_heads=s.kv_heads,
        head_dim=head,
        query_pre_attn_scalar=head,
        sliding_window=s.window,
        layer_types=layer_types,
        tie_word_embeddings=True,
    )


def _phi3(s: Shape, vocab: int, ids: TokenIds):
    from transformers import Phi3Config

    # Phi3Config's defaults name token 32000 as pad and EOS: out of range for any other vocabulary.
    return Phi3Config(
        **_common(s, vocab, ids), num_key_value_heads=s.kv_heads, sliding_window=None, tie_word_embeddings=False
    )


def _gpt_neox(s: Shape, vocab: int, ids: TokenIds):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**_common(s, vocab, ids), tie_word_embeddings=False)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("gpt2", "eos", _gpt2, "Conv1D layers (transposed weights), fused c_attn, tied embeddings"),
        Family("llama", "none", _llama, "no pad token, grouped-query attention, RMSNorm, rotary positions"),
        Family("mistral", "none", _mistral, "no pad token, grouped-query and sliding-window attention"),
        Family("qwen2", "eos", _qwen2, "grouped-query attention, tied embeddings, biased q/k/v"),
        Family(
            "gemma3",
            "own",
            _gemma3,
            "own pad token, tied and scaled embeddings, alternating sliding/global attention, (1 + w) RMSNorm",
        ),
        Family("phi3", "none", _phi3, "no pad token, fused qkv_proj and gate_up_proj, no PEFT default targets"),
        Family("gpt_neox", "none", _gpt_neox, "no pad token, fused query_key_value, parallel residual, partial rotary"),
    )
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ModelError(f"Unknown model family '{name}'. Tiny models exist for: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def embedded_tokenizer(tokenizer_dir: Path | None = None):
    """The embedded model's tokenizer: loaded from a model folder, or trained afresh on the public corpus."""
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    from common.data.corpus import generate_public_corpus
    from common.model.embedded import train_tokenizer

    return train_tokenizer(generate_public_corpus(seed=1234, num_documents=3000), vocab_size=2048)


def family_config(name: str, vocab_size: int, shape: Shape = Shape(), ids: TokenIds | None = None):
    """The `transformers` config of `name` at `shape` (token ids default to 0 = BOS = EOS, no pad)."""
    return family(name).config(shape, vocab_size, ids or TokenIds(bos=0, eos=0, pad=None))


def build_tiny_model(
    name: str,
    folder: Path,
    *,
    shape: Shape = Shape(),
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write a random-initialised `name` model with the embedded tokenizer to `folder`, as save_pretrained does."""
    from transformers import AutoModelForCausalLM

    spec = family(name)
    tokenizer = embedded_tokenizer(tokenizer_dir)
    if spec.padding == "none":
        tokenizer.pad_token = None
    elif spec.padding == "own":
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    else:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    ids = TokenIds(bos=tokenizer.eos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    config = spec.config(shape, len(tokenizer), ids)
    # Forked so that building a model leaves the caller's random state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.to(dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(folder)
    return folder
