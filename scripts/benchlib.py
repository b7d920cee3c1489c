"""What every benchmark script shares: the micro model, the device it ran on and how results are written."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

# Quick (smoke) mode: a micro embedded model, same code path as the default (tests/conftest.py uses the same).
MICRO = [
    "model.embedded.n_layer=2",
    "model.embedded.n_head=2",
    "model.embedded.n_embd=64",
    "model.embedded.corpus_documents=3000",
    "model.embedded.steps=150",
]


def simulation_cores() -> int:
    """The cores a simulation may use on this machine: $FEDSOV_SIMULATION_CPUS where set (as
    `simulation.cpus` reads it), else all of them."""
    import os

    return int(os.environ.get("FEDSOV_SIMULATION_CPUS") or os.cpu_count() or 1)


# What every benchmark process imports: a mode run in a fresh process should pay for its work, not again for these.
PRELOAD = ("torch", "transformers", "peft", "opacus")


def each_in_own_process(
    function: Callable[..., dict], calls: Iterable[tuple], preload: Sequence[str] = PRELOAD
) -> Iterator[tuple[dict | None, str]]:
    """`function(*args)` for each `args` in `calls`, each in a process of its own, so that its peak memory is its
    own; yields (result, "") or (None, why it failed). The processes are forked from a server (multiprocessing's
    forkserver) that imported `preload` once and has run nothing: each skips about 6 CPU seconds of imports, and no
    thread pool or CUDA context is ever forked. `function` must be a module-level function of an importable
    module (a script's own functions are, under `if __name__ == "__main__"`)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    for args in calls:
        # One executor per call: its one worker process runs this call only.
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            try:
                yield pool.submit(function, *args).result(), ""
            except BrokenProcessPool:
                # Killed by the kernel (SIGKILL) is how running out of memory shows on Linux.
                yield None, "the process died (killed: out of memory?)"
            except Exception as err:  # noqa: BLE001 - a mode that fails is reported, not hidden
                yield None, f"{type(err).__name__}: {err}"


def device_name() -> str:
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"


def write_results(
    out_dir: Path, name: str, record: dict, lines: list[str], plot: Callable[[object], None] | None = None
) -> None:
    """`<name>.json` (the record), `<name>.md` (the table) and, given `plot(figure)`, `<name>.png`;
    then the table on stdout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and CI
        from matplotlib import pyplot

        figure = pyplot.figure(figsize=(9, 4))
        plot(figure)
        figure.tight_layout()
        figure.savefig(out_dir / f"{name}.png", dpi=110)
        pyplot.close(figure)
        record = {**record, "plot": f"{name}.png"}
        lines = [*lines, "", f"![{name}]({name}.png)"]
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def time_training_steps(model, ids, mode: str, batch: int, steps: int, warmup: int, device) -> dict[str, list[float]]:
    """Wall and process-CPU seconds of each timed step (after `warmup`) of LoRA training on `ids` in batches of
    `batch`: non-private, or DP-SGD in one of Opacus's per-sample gradient modes (hooks, functorch, ghost).
    CPU seconds count only this process's work: on a shared machine they vary less than wall seconds."""
    import time

    import torch
    from torch import nn

    vocab = model.config.vocab_size
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    trainer = model
    if mode != "non-private":
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(ids), batch_size=batch)
        engine = PrivacyEngine(accountant="rdp")
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            criterion=criterion,
            grad_sample_mode=mode,
            poisson_sampling=False,
        )
        # Ghost clipping also wraps the loss; the other modes return (module, optimizer, loader).
        trainer, optimizer = made[0], made[1]
        if mode == "ghost":
            criterion = made[2]
    trainer.train()
    times: dict[str, list[float]] = {"wall": [], "cpu": []}
    for step in range(warmup + steps):
        x = ids[step * batch : (step + 1) * batch].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        logits = trainer(input_ids=x, use_cache=False).logits[:, :-1].float()
        target = x[:, 1:]
        flat_logits, flat_target = logits.reshape(-1, vocab), target.reshape(-1)
        loss = (
            criterion(flat_logits, flat_target, shape=target.shape)
            if mode == "ghost"
            else criterion(flat_logits, flat_target)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times["wall"].append(time.perf_counter() - t0)
            times["cpu"].append(time.process_time() - c0)
    return times


def plain_gradient(model, ids, mask):
    """The gradient of the batch's mean unit loss for the adapter, without Opacus or clipping, flattened: what
    the same model's numerics give without DP, to tell a dtype's own error from the DP path's."""
    import torch

    from client.training import unit_losses

    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    try:
        # .backward, not autograd.grad: reentrant gradient checkpointing reaches the adapter only through .grad
        unit_losses(model, ids, mask)[0].mean().backward()
    finally:
        model.eval()
    grads = torch.cat([p.grad.flatten() for p in params])
    model.zero_grad(set_to_none=True)
    return grads


def noiseless_dp_update(model, ids, mask, max_grad_norm: float = 1.0):
    """The adapter change of one DP-SGD step on a fixed batch with noise off and plain SGD (lr 1): minus
    the mean of the clipped per-unit gradients, flattened. Same batch and model in, same update out."""
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from client.training import unit_losses
    from common.model.lora import adapter_state

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=ids.shape[0],
        loss_reduction="mean",
    )
    before = adapter_state(model)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    model.train()
    try:
        unit_losses(wrapped, ids, mask)[0].mean().backward()
        optimizer.step()
    finally:
        wrapped._close()
        model.eval()
    after = adapter_state(model)
    return torch.cat([(after[k] - before[k]).flatten() for k in before])
