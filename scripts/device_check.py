#!/usr/bin/env python3
"""fedsov's GPU path, checked in one call on a CUDA machine; the numbers go to one JSON file.

Checks, most important first, each in its own try/except (a failure is recorded and the next check
runs), under a total time limit (what is left when it runs out is recorded as skipped):
  families     every family's tiny model on the GPU: bfloat16 base, float32 LoRA on all linear
               layers, two DP-SGD steps (fedsov's train_locally), adapter saved, reloaded, generating
  noise        two processes with the same public seeds draw different DP noise, on the GPU
  bf16         one noiseless DP-SGD step on a ~1B Llama shape: the adapter update with a bfloat16
               (and, measured only, float16) base against a float32 base, same weights and batch;
               and bfloat16 under gradient checkpointing
  scale-1.1B   DP vs non-DP on a 1.1B Llama shape (TinyLlama's): tokens/s and peak memory for
               non-private, Opacus hooks, ghost clipping, hooks with gradient checkpointing
  scale-3.6B   the same on Llama 3.2 3B's shape (untied embeddings: 3.6B), if time is left
The JSON is rewritten after every check, so a run cut short keeps what it measured. Without CUDA
the script says so and exits 0, writing nothing (a GPU result at --out is never overwritten).

    python3 scripts/device_check.py --out $OUT/device-check.json      # on the GPU machine, ~5 min
    python3 scripts/device_check.py --cpu-rehearsal --out /tmp/dc.json # every check at micro size on a CPU

Beyond torch, transformers and peft it imports opacus, omegaconf and antlr4 (omegaconf's parser): all pure
Python, so a machine without them can take the three folders from a .venv's site-packages on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# A bfloat16 base's update is judged against what bfloat16 does to the same model without DP: bfloat16 keeps 8
# significant bits, so activations carry ~0.4% error per rounding and a deep model compounds it. The first GPU
# run (H200, 1.1B shape) measured 5.2% for the DP update, so a fixed 5% said nothing about the DP path. The
# DP path (per-unit gradients, clipping) may add at most half again the plain gradient's own error (plus 1%),
# and never more than 20% in all: a wrong gradient (a module left out, a lost scale) is off by ~100%.
DP_PATH_EXTRA_ERROR = 1.5
DP_PATH_SLACK = 0.01
GROSS_ERROR = 0.20

NOISE_PROBE = """
import json, sys, torch
torch.manual_seed(0)  # the same public seed in both processes
from opacus.optimizers import optimizer as dp_optimizer
from client.training import DpSettings, train_locally
from common.config import LoraSettings
from common.model.loading import load_base_model
from common.model.lora import attach_lora
drawn = []
original = dp_optimizer._generate_noise
def recording(std, reference, generator=None, secure_mode=False):
    noise = original(std, reference, generator, secure_mode)
    drawn.append({"device": noise.device.type, "values": noise.flatten()[:8].tolist()})
    return noise
dp_optimizer._generate_noise = recording
device = torch.device(sys.argv[2])
model = attach_lora(load_base_model(sys.argv[1], device, torch.float32), LoraSettings(rank=4, alpha=8), seed=0)
train_locally(model, [[1, 2, 3, 4, 5]] * 16, steps=1, batch_size=4, learning_rate=1e-2,
              dp=DpSettings(noise_multiplier=1.0, max_grad_norm=1.0), pad_id=0)
print(json.dumps(drawn))
"""


class Context:
    def __init__(self, device, rehearsal: bool, workdir: Path):
        import torch

        from common.config import DtypeChoice
        from common.model.loading import pick_dtype

        self.device = device
        self.dtype = pick_dtype(DtypeChoice.auto, device) if not rehearsal else torch.bfloat16
        self.rehearsal = rehearsal
        self.workdir = workdir
        self._tokenizer_dir: Path | None = None

    def tiny_model(self, family: str) -> Path:
        from common.model.families import build_tiny_model, embedded_tokenizer

        if self._tokenizer_dir is None:
            self._tokenizer_dir = self.workdir / "tokenizer"
            embedded_tokenizer().save_pretrained(self._tokenizer_dir)
        folder = self.workdir / family
        if not (folder / "config.json").is_file():
            build_tiny_model(family, folder, tokenizer_dir=self._tokenizer_dir)
        return folder


def check_families(ctx: Context) -> dict:
    import torch
    from peft import PeftModel

    from client.training import DpSettings, train_locally
    from common.config import LoraSettings
    from common.model.families import FAMILIES
    from common.model.loading import load_base_model, load_tokenizer
    from common.model.lora import adapter_state, attach_lora, save_adapter

    out = {}
    for name in FAMILIES:
        started = time.monotonic()
        try:
            folder = ctx.tiny_model(name)
            tok = load_tokenizer(folder)
            model = attach_lora(
                load_base_model(folder, ctx.device, ctx.dtype),
                LoraSettings(rank=4, alpha=8, target_modules=["all-linear"]),
                seed=0,
            )
            trainable = [p for p in model.parameters() if p.requires_grad]
            g = torch.Generator().manual_seed(1)
            examples = [torch.randint(1, len(tok) - 1, (int(n),), generator=g).tolist() for n in [41, 23, 33] * 8]
            result = train_locally(
                model,
                examples,
                steps=2,
                batch_size=6,
                learning_rate=1e-2,
                dp=DpSettings(noise_multiplier=1.0, max_grad_norm=1.0),
                pad_id=tok.pad_token_id,
            )
            moved = sum(int(u.abs().sum() > 0) for u in result.update.values())
            finite = all(bool(torch.isfinite(u).all()) for u in result.update.values())
            save_adapter(model, adapter_state(model), ctx.workdir / f"{name}-adapter", folder)
            reloaded = PeftModel.from_pretrained(
                load_base_model(folder, ctx.device, ctx.dtype), str(ctx.workdir / f"{name}-adapter")
            )
            prompt = tok("hello there", return_tensors="pt").to(ctx.device)
            generated = reloaded.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            out[name] = {
                "ok": finite and moved == len(result.update) and generated.shape[1] == prompt["input_ids"].shape[1] + 4,
                "loss": result.mean_loss,
                "tensors_trained": len(result.update),
                "tensors_moved": moved,
                "lora_dtypes": sorted({str(p.dtype) for p in trainable}),
                "lora_devices": sorted({p.device.type for p in trainable}),
                "base_dtypes": sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad}),
                "seconds": time.monotonic() - started,
            }
        except TimeUp:
            raise
        except Exception as err:  # one family's failure must not hide the others'
            out[name] = {
                "ok": False,
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-1500:],
            }
        finally:
            free_memory()
    return {"passed": all(r["ok"] for r in out.values()), "families": out}


def check_noise(ctx: Context) -> dict:
    folder = ctx.tiny_model("llama")
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", NOISE_PROBE, str(folder), ctx.device.type],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    outputs = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"noise probe failed: {stderr.strip()[-1500:]}")
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    first, second = outputs
    devices = sorted({d["device"] for run in outputs for d in run})
    differ = len(first) == len(second) > 0 and all(
        a["values"] != b["values"] for a, b in zip(first, second, strict=True)
    )
    return {
        "passed": differ and devices == [ctx.device.type],
        "draws_per_process": len(first),
        "noise_devices": devices,
        "all_draws_differ": differ,
        "first_values": [first[0]["values"][:4], second[0]["values"][:4]],
    }


def check_bf16(ctx: Context, shape_name: str) -> dict:
    import copy

    import torch
    from bench_model_scale import SHAPES, build

    from client.training import collate
    from common.config import LoraSettings
    from common.model.loading import enable_gradient_checkpointing
    from common.model.lora import attach_lora

    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    reference_base = build(shape, ctx.device, torch.float32)
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(64, 257, (8,), generator=g).tolist()
    examples = [torch.randint(1, shape.vocab, (n,), generator=g).tolist() for n in lengths]
    ids, mask = collate(examples, 0, ctx.device)

    def update(source, dtype, checkpointing=False):
        """One noiseless DP-LoRA update of a `dtype` copy of `source` (the float32 base stays untouched), and the
        plain gradient of the same copy without DP."""
        from benchlib import noiseless_dp_update, plain_gradient

        base = copy.deepcopy(source).to(dtype)
        if checkpointing:
            enable_gradient_checkpointing(base)
        model = attach_lora(base, LoraSettings(rank=16, alpha=32, target_modules=["all-linear"]), seed=0)
        b = torch.Generator().manual_seed(3)
        with torch.no_grad():  # B starts at zero, which would leave A's gradients unchecked
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_((torch.randn(p.shape, generator=b) * 0.02).to(p.device))
        try:
            plain = plain_gradient(model, ids, mask).double().cpu()
            return noiseless_dp_update(model, ids, mask).double().cpu(), plain
        finally:
            del model, base
            free_memory()

    reference, reference_plain = update(reference_base, torch.float32)
    out = {
        "shape": shape_name,
        "params": sum(p.numel() for p in reference_base.parameters()),
        "batch": len(examples),
        "tokens": sum(lengths),
        "criterion": f"DP update's relative L2 error <= {DP_PATH_EXTRA_ERROR} x the plain gradient's + "
        f"{DP_PATH_SLACK}, and <= {GROSS_ERROR}",
    }
    for label, dtype, checkpointing in (
        ("bfloat16", torch.bfloat16, False),
        ("float16", torch.float16, False),
        ("bfloat16+checkpointing", torch.bfloat16, True),
    ):
        u, plain = update(reference_base, dtype, checkpointing)
        # float64: a float32 cosine over ~10M values is off by ~1e-3, more than what it measures here
        out[label] = {
            "relative_l2_error": float((u - reference).norm() / reference.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(u, reference, dim=0)),
            "plain_gradient_relative_l2_error": float((plain - reference_plain).norm() / reference_plain.norm()),
            "finite": bool(torch.isfinite(u).all()),
        }
    out["passed"] = all(within_dtype_error(out[k]) for k in ("bfloat16", "bfloat16+checkpointing"))
    return out


def within_dtype_error(measured: dict) -> bool:
    """Whether a dtype's DP update is off by no more than the dtype itself makes the plain gradient off."""
    error = measured["relative_l2_error"]
    allowed = DP_PATH_EXTRA_ERROR * measured["plain_gradient_relative_l2_error"] + DP_PATH_SLACK
    return measured["finite"] and error <= allowed and error <= GROSS_ERROR


def check_scale(ctx: Context, shape_name: str) -> dict:
    from bench_model_scale import MODES, SHAPES, run_one

    batch, length, steps, warmup = (2, 32, 2, 1) if ctx.rehearsal else (8, 512, 5, 2)
    results = {}
    for mode in MODES:
        try:
            results[mode] = run_one(SHAPES[shape_name], mode, batch, length, steps, warmup)
        except TimeUp:
            raise
        except Exception as err:
            results[mode] = {"error": f"{type(err).__name__}: {err}"}
        finally:
            free_memory()
    base = results.get("non-private", {})
    for r in results.values():
        if "error" not in r and "error" not in base:
            r["time_ratio"] = r["s_per_step"] / base["s_per_step"]
            r["memory_ratio"] = r["peak_mb"] / base["peak_mb"]
    out = {
        "passed": not any("error" in r for r in results.values()),
        "shape": shape_name,
        "batch": batch,
        "sequence_length": length,
        "modes": results,
    }
    if ctx.device.type != "cuda":
        out["note"] = "memory per mode is meaningful on CUDA only: a process's peak RSS never goes down between modes"
    return out


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))


class TimeUp(Exception):
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "device-check" / "device-check.json")
    parser.add_argument("--time-limit", type=float, default=420.0, help="seconds for all checks together")
    parser.add_argument(
        "--cpu-rehearsal",
        action="store_true",
        help="run every check at micro size on the CPU (to test this script without a GPU)",
    )
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.cpu_rehearsal:
        print(
            f"device_check.py needs a CUDA device and found none (torch {torch.__version__}): nothing was checked "
            "and nothing written. Run it on a machine with an NVIDIA GPU."
        )
        return 0
    import opacus
    import peft
    import transformers
    from benchlib import device_name

    device = torch.device("cpu" if args.cpu_rehearsal else "cuda")
    big = "micro" if args.cpu_rehearsal else "1.1B"
    checks = [
        ("families", check_families),
        ("noise", check_noise),
        ("bf16", lambda c: check_bf16(c, big)),
        (f"scale-{big}", lambda c: check_scale(c, big)),
    ]
    if not args.cpu_rehearsal:
        checks.append(("scale-3.6B", lambda c: check_scale(c, "3.6B")))
    record = {
        "benchmark": "device-check",
        "device": device_name() if not args.cpu_rehearsal else "cpu (rehearsal)",
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "opacus": opacus.__version__,
        },
        "time_limit_s": args.time_limit,
        "checks": {},
    }
    started = time.monotonic()

    def time_up(signum, frame):
        raise TimeUp(f"the total time limit of {args.time_limit:.0f} s ran out during this check")

    signal.signal(signal.SIGALRM, time_up)
    signal.alarm(int(args.time_limit))
    with tempfile.TemporaryDirectory(prefix="fedsov-device-check-") as workdir:
        ctx = Context(device, args.cpu_rehearsal, Path(workdir))
        for name, check in checks:
            t0 = time.monotonic()
            if t0 - started >= args.time_limit:
                record["checks"][name] = {"status": "skipped", "why": "the total time limit ran out before it"}
                continue
            try:
                result = check(ctx)
                status = "passed" if result.pop("passed") else "failed"
            except Exception as err:  # TimeUp included: record it and go on with what time is left
                result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
                status = "error"
            finally:
                free_memory()
            record["checks"][name] = {"status": status, "seconds": round(time.monotonic() - t0, 1), **result}
            record["total_seconds"] = round(time.monotonic() - started, 1)
            write(record, args.out)
            print(f"{name}: {status} ({record['checks'][name]['seconds']} s)", flush=True)
    signal.alarm(0)
    print(f"Results: {args.out}")
    return 0 if all(c["status"] == "passed" for c in record["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
