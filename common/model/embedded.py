"""The embedded default base model: a small GPT-2 that fedsov pre-trains itself.

Nothing is downloaded. A byte-level BPE tokenizer and a GPT-2 are trained on the PII-free
corpus of `common.data.corpus`, deterministically from the recipe, and cached under
`<cache_dir>/models/embedded-<recipe hash>/` as an ordinary Hugging Face model folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from common.config import EmbeddedRecipe
from common.data.corpus import generate_public_corpus

# Bump when the build procedure changes, so old caches are not mistaken for new builds.
BUILD_VERSION = 1
BUILD_INFO = "fedsov-build.json"
EOS = "<|endoftext|>"


def embedded_model_dir(cache_dir: Path | str, recipe: EmbeddedRecipe) -> Path:
    """Cache folder named by a hash of the recipe, the build version and the corpus itself."""
    recipe_json = json.dumps({"v": BUILD_VERSION, **dataclasses.asdict(recipe)}, sort_keys=True)
    return Path(cache_dir) / "models" / f"embedded-{_build_digest(recipe_json, recipe.seed, recipe.corpus_documents)}"


@functools.lru_cache(maxsize=4)
def _build_digest(recipe_json: str, seed: int, corpus_documents: int) -> str:
    # Generating the corpus takes ~0.2 s and every node start asks for the folder: once per process is enough,
    # since the generator's code (what the corpus part of the hash guards against) cannot change within one.
    h = hashlib.sha256(recipe_json.encode())
    for doc in generate_public_corpus(seed=seed, num_documents=corpus_documents):
        h.update(doc.encode())
    return h.hexdigest()[:12]


def ensure_embedded_model(cache_dir: Path | str, recipe: EmbeddedRecipe, log: Callable[[str], None] = print) -> Path:
    """Return the cached model folder, building it first if needed (once, under a lock)."""
    target = embedded_model_dir(cache_dir, recipe)
    if (target / BUILD_INFO).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target.parent / ".build.lock"):
        if (target / BUILD_INFO).is_file():  # another process built it while we waited
            return target
        log(f"Building the embedded base model (first use, cached afterwards) in {target} ...")
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
        try:
            info = build_embedded_model(tmp, recipe, log=log)
            if target.exists():  # left over from an interrupted build: no build record
                shutil.rmtree(target)
            tmp.rename(target)  # atomic: the folder appears complete or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(
            f"Embedded base model ready: {info['parameters']:,} parameters, held-out perplexity "
            f"{info['heldout_perplexity']:.2f} on public text, built in {info['seconds']:.0f}s."
        )
    return target


def build_embedded_model(out_dir: Path, recipe: EmbeddedRecipe, log: Callable[[str], None] = print) -> dict:
    """Train tokenizer and model from the recipe into `out_dir`; return the build record."""
    from transformers import GPT2Config, GPT2LMHeadModel

    started = time.time()
    documents = generate_public_corpus(seed=recipe.seed, num_documents=recipe.corpus_documents)
    n_val = max(1, len(documents) // 20)
    train_docs, val_docs = documents[n_val:], documents[:n_val]
    tokenizer = train_tokenizer(train_docs, recipe.vocab_size)
    train_blocks = _pack(tokenizer, train_docs, recipe.context)
    val_blocks = _pack(tokenizer, val_docs, recipe.context)

    torch.manual_seed(recipe.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=recipe.context,
        n_embd=recipe.n_embd,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01)
    warmup = max(1, recipe.steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, recipe.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    sampler = torch.Generator().manual_seed(recipe.seed)
    model.train()
    losses = []
    for step in range(recipe.steps):
        idx = torch.randint(len(train_blocks), (recipe.batch_size,), generator=sampler)
        batch = train_blocks[idx]
        logits = model(input_ids=batch).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), label_smoothing=recipe.label_smoothing
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, recipe.steps // 5) == 0:
            log(f"  pre-training step {step + 1}/{recipe.steps}: loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")

    model.eval()
    with torch.no_grad():
        total, count = 0.0, 0
        for chunk in val_blocks.split(32):
            logits = model(input_ids=chunk).logits[:, :-1]
            targets = chunk[:, 1:].reshape(-1)
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets, reduction="sum"
            ).item()
            count += targets.numel()
        val_loss = total / count
        prompt = tokenizer("Hello, I am writing about my order", return_tensors="pt")
        sample_ids = model.generate(**prompt, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {
        "build_version": BUILD_VERSION,
        "recipe": dataclasses.asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens_seen": recipe.steps * recipe.batch_size * recipe.context,
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "heldout_perplexity": math.exp(val_loss),
        "greedy_sample": tokenizer.decode(sample_ids[0], skip_special_tokens=True),
        "weights_sha256": hashlib.sha256((out_dir / "model.safetensors").read_bytes()).hexdigest(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "seconds": time.time() - started,
    }
    (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=1, ensure_ascii=False))
    return info


def train_tokenizer(documents: list[str], vocab_size: int):
    """The embedded model's byte-level BPE tokenizer (EOS doubles as BOS, UNK and pad), trained on `documents`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)


def _pack(tokenizer, documents: list[str], context: int) -> torch.Tensor:
    """Concatenate documents with EOS separators and cut into context-sized blocks."""
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer(doc)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // context
    return torch.tensor(ids[: n * context], dtype=torch.long).view(n, context)


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
