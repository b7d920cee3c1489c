"""DP-LoRA on the micro embedded model: adapters really change, hooks come off, FFA keeps A."""

import json
import math

import pytest
import torch

from client.training import DpSettings, encode_units, heldout_loss, train_locally
from common.config import EmbeddedRecipe, LoraSettings, PrivacyUnitKind
from common.data.synthetic import generate_region_records
from common.model.embedded import BUILD_INFO, build_embedded_model, embedded_model_dir
from common.model.loading import load_base_model, load_tokenizer
from common.model.lora import adapter_state, attach_lora, load_adapter_state, trainable_names
from common.privacy.units import group_units


@pytest.fixture(scope="module")
def model_dir(model_cache):
    return next((model_cache / "models").glob("embedded-*"))


@pytest.fixture(scope="module")
def examples(model_dir):
    tok = load_tokenizer(model_dir)
    recs = generate_region_records("us", ["en_US"], seed=5, num_users=40)
    return encode_units(group_units(recs, PrivacyUnitKind.record), tok, 96), tok.pad_token_id


def fresh_lora(model_dir, ffa=False):
    base = load_base_model(model_dir, torch.device("cpu"), torch.float32)
    return attach_lora(base, LoraSettings(rank=4, alpha=8, ffa=ffa), seed=0)


def test_embedded_model_generates_its_training_distribution(model_dir):
    info = json.loads((model_dir / BUILD_INFO).read_text())
    # Far below the 2048-token vocabulary: it has learnt the public text, not noise.
    assert info["heldout_perplexity"] < 20
    words = info["greedy_sample"].split()
    assert len(words) > 10 and words[:6] == "Hello, I am writing about my".split()


def test_embedded_build_is_deterministic(tmp_path):
    recipe = EmbeddedRecipe(n_layer=1, n_head=2, n_embd=32, corpus_documents=300, steps=5, vocab_size=512)
    a = build_embedded_model(tmp_path / "a", recipe, log=lambda m: None)
    b = build_embedded_model(tmp_path / "b", recipe, log=lambda m: None)
    assert a["weights_sha256"] == b["weights_sha256"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert embedded_model_dir(tmp_path, recipe) != embedded_model_dir(tmp_path, EmbeddedRecipe())


def test_dp_round_changes_the_adapter_and_can_run_again(model_dir, examples):
    ids, pad = examples
    model = fresh_lora(model_dir)
    before = adapter_state(model)
    dp = DpSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    result = train_locally(model, ids, steps=3, batch_size=8, learning_rate=1e-2, dp=dp, pad_id=pad)
    after = adapter_state(model)
    assert set(result.update) == set(trainable_names(model))
    assert all(result.update[k].abs().sum() > 0 for k in result.update)
    assert all(torch.allclose(after[k] - before[k], result.update[k]) for k in result.update)
    assert math.isfinite(result.mean_loss) and result.steps == 3
    # Opacus hooks were removed: the same cached model trains again without double hooks.
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    train_locally(model, ids, steps=1, batch_size=8, learning_rate=1e-2, dp=dp, pad_id=pad)


def test_empty_poisson_batches_still_release_noise(model_dir, examples):
    ids, pad = examples
    model = fresh_lora(model_dir)
    # q = 1e-9 over ~150 units: every batch is empty (the sampling is secret, so the test cannot pick its
    # seed: at q = 1e-4 a unit was drawn in about 3% of runs; here in 3e-7), yet the noisy step must happen.
    result = train_locally(
        model,
        ids,
        steps=2,
        batch_size=1e-9 * len(ids),
        learning_rate=1e-2,
        dp=DpSettings(noise_multiplier=1.0, max_grad_norm=1.0),
        pad_id=pad,
    )
    assert result.units_sampled == 0
    assert all(result.update[k].abs().sum() > 0 for k in result.update)


def test_ffa_lora_trains_only_b(model_dir, examples):
    ids, pad = examples
    model = fresh_lora(model_dir, ffa=True)
    before = adapter_state(model)
    result = train_locally(model, ids, steps=2, batch_size=8, learning_rate=1e-2, dp=DpSettings(1.0, 1.0), pad_id=pad)
    assert result.update and all("lora_B" in k for k in result.update)
    after = adapter_state(model)
    assert all(torch.equal(after[k], before[k]) for k in after if "lora_A" in k)


def test_training_lowers_heldout_loss_and_loaded_state_reproduces_it(model_dir, examples):
    ids, pad = examples
    train, heldout = ids[:-40], ids[-40:]
    model = fresh_lora(model_dir)
    base_loss, n = heldout_loss(model, heldout, batch_size=64, pad_id=pad)
    train_locally(model, train, steps=15, batch_size=16, learning_rate=1e-2, dp=None, pad_id=pad)
    tuned_loss, _ = heldout_loss(model, heldout, batch_size=64, pad_id=pad)
    assert tuned_loss / n < base_loss / n - 0.1
    other = fresh_lora(model_dir)
    load_adapter_state(other, adapter_state(model))
    assert heldout_loss(other, heldout, batch_size=64, pad_id=pad)[0] == pytest.approx(tuned_loss, rel=1e-5)


def update_norm(result) -> float:
    return float(torch.cat([v.flatten() for v in result.update.values()]).norm())


def test_dp_sgd_moves_by_the_clipped_mean_and_dp_adam_does_not(model_dir, examples):
    """Without noise, a DP-SGD step moves the adapter by lr * (sum of clipped gradients) / B: at most lr * C per
    unit sampled, over B. DP-Adam normalises every value instead, so the same run moves it much further."""
    ids, pad = examples
    lr, clip, batch = 1e-2, 1.0, 8
    noiseless = DpSettings(noise_multiplier=0.0, max_grad_norm=clip)
    sgd, adam = (
        train_locally(
            fresh_lora(model_dir),
            ids,
            steps=3,
            batch_size=batch,
            learning_rate=lr,
            dp=noiseless,
            pad_id=pad,
            optimizer_name=name,
        )
        for name in ("sgd", "adamw")
    )
    assert 0 < update_norm(sgd) <= lr * clip * sgd.units_sampled / batch + 1e-6
    assert update_norm(adam) > 10 * lr * clip * adam.units_sampled / batch


def test_sgd_without_dp_clips_the_batch_gradient(model_dir, examples):
    ids, pad = examples
    clipped = train_locally(
        fresh_lora(model_dir),
        ids,
        steps=3,
        batch_size=8,
        learning_rate=1.0,
        dp=None,
        pad_id=pad,
        optimizer_name="sgd",
        max_grad_norm=1e-3,
    )
    free = train_locally(
        fresh_lora(model_dir), ids, steps=3, batch_size=8, learning_rate=1.0, dp=None, pad_id=pad, optimizer_name="sgd"
    )
    assert 0 < update_norm(clipped) <= 3 * 1e-3 + 1e-7 < update_norm(free)


def test_dp_rmsprop_starts_from_the_noise_variance_and_needs_dp():
    """Its first step divides by sqrt(alpha (sigma C / B)^2 + (1 - alpha) g^2), not by sqrt(g^2) (a sign step)."""
    from client.training import local_optimizer
    from common.secagg.encoding import RMSPROP_ALPHA

    sigma, clip, batch, lr = 1.5, 0.5, 16, 1e-2
    value = torch.nn.Parameter(torch.zeros(4))
    gradient = torch.tensor([0.04, -0.01, 0.0, 1.0])  # noise per value here: sigma C / B = 0.047
    optimizer = local_optimizer("rmsprop", [value], lr, DpSettings(noise_multiplier=sigma, max_grad_norm=clip), batch)
    value.grad = gradient.clone()
    optimizer.step()
    mean_square = RMSPROP_ALPHA * (sigma * clip / batch) ** 2 + (1 - RMSPROP_ALPHA) * gradient**2
    expected = -lr * gradient / (mean_square.sqrt() + 1e-8)
    assert torch.allclose(value.detach(), expected, rtol=1e-5, atol=1e-9)
    # Within the noise's scale the step follows the gradient (a fresh Adam's first step is lr * sign(g) instead).
    assert float(value[0] / value[1]) == pytest.approx(-4.0, rel=0.01)
    with pytest.raises(ValueError, match="rmsprop needs DP"):
        local_optimizer("rmsprop", [value], lr, None, batch)


def test_dp_rmsprop_round_stays_in_its_secure_sum_range(model_dir, examples):
    """Whatever the noise, a round's RMSprop update fits the range the coordinator derives: nothing is clipped."""
    import numpy as np

    from common.secagg.encoding import update_range

    lr, steps = 1e-2, 6
    # Almost no noise: the prior is tiny and the first steps are as large as RMSprop's bound allows.
    values = round_update(model_dir, examples, "rmsprop", lr, steps, DpSettings(noise_multiplier=1e-6, max_grad_norm=1))
    assert lr * steps < np.abs(values).max() <= update_range("rmsprop", lr, steps, 1.0)


def round_update(model_dir, examples, optimizer: str, lr: float, steps: int, dp: DpSettings):
    """One round of DP training from a fresh adapter at batch 8, its update flattened as the secure sum sees it."""
    from common.secagg.encoding import flatten, layout_of

    ids, pad = examples
    lora = fresh_lora(model_dir)
    result = train_locally(
        lora, ids, steps=steps, batch_size=8, learning_rate=lr, dp=dp, pad_id=pad, optimizer_name=optimizer
    )
    return flatten(result.update, layout_of(result.update))


def test_dp_sgd_update_fits_the_secure_sum_range(model_dir, examples):
    """The range the coordinator derives for an SGD round holds a real noisy round: nothing is clipped."""
    import numpy as np

    from common.secagg.encoding import Quantization, update_range

    lr, steps, clip = 0.5, 5, 0.1
    values = round_update(model_dir, examples, "sgd", lr, steps, DpSettings(noise_multiplier=1.0, max_grad_norm=clip))
    bound = update_range("sgd", lr, steps, clip)
    assert np.abs(values).max() < bound < update_range("adamw", lr, steps, clip)
    assert Quantization.for_cohort(bound, 1000).encode(values, 500)[1] == 0


def test_unknown_optimizer_is_refused(model_dir, examples):
    ids, pad = examples
    with pytest.raises(ValueError, match="adamw, sgd or rmsprop"):
        train_locally(
            fresh_lora(model_dir),
            ids,
            steps=1,
            batch_size=8,
            learning_rate=1e-2,
            dp=None,
            pad_id=pad,
            optimizer_name="lion",
        )


NOISE_PROBE = """
import json, sys, torch
torch.manual_seed(0)  # the same public seed in both processes, as after the embedded build
from opacus.optimizers import optimizer as dp_optimizer
from client.training import DpSettings, train_locally
from common.config import LoraSettings
from common.model.loading import load_base_model
from common.model.lora import attach_lora
drawn = []
original = dp_optimizer._generate_noise
def recording(std, reference, generator=None, secure_mode=False):
    noise = original(std, reference, generator, secure_mode)
    drawn.append(noise.flatten()[:16].tolist())
    return noise
dp_optimizer._generate_noise = recording
device = torch.device(sys.argv[2])
model = attach_lora(load_base_model(sys.argv[1], device, torch.float32), LoraSettings(rank=4, alpha=8), seed=0)
examples = [[1, 2, 3, 4, 5]] * 16
train_locally(model, examples, steps=1, batch_size=4, learning_rate=1e-2,
              dp=DpSettings(noise_multiplier=1.0, max_grad_norm=1.0), pad_id=0)
print(json.dumps(drawn))
"""


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(),
                reason="no CUDA device on this machine (scripts/device_check.py runs this check on a GPU)",
            ),
        ),
    ],
)
def test_two_processes_with_the_same_public_seeds_draw_different_noise(model_dir, device):
    """The DP noise comes from a generator seeded by the OS, not from any seed the coordinator knows."""
    import subprocess
    import sys

    runs = [
        subprocess.Popen([sys.executable, "-c", NOISE_PROBE, str(model_dir), device], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    first, second = (json.loads(p.communicate(timeout=300)[0]) for p in runs)
    assert first and len(first) == len(second)  # one draw per trained tensor
    for a, b in zip(first, second, strict=True):
        assert a != b
