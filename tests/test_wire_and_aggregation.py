import dataclasses
from collections import OrderedDict

import pytest
import torch

from common.schema import SchemaError
from common.wire import RoundPlan, WireError, record_to_state, state_to_record
from server.aggregation import apply_update, check_update, weighted_mean


def lora_like_state():
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        (f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.weight", torch.randn(shape, generator=g) * 1e-2)
        for i in range(2)
        for ab, shape in (("A", (8, 64)), ("B", (192, 8)))
    )


def test_adapter_state_round_trips_through_the_wire_format_exactly():
    state = lora_like_state()
    again = record_to_state(state_to_record(state))
    assert list(again) == list(state)
    for k in state:
        assert again[k].dtype == torch.float32 and torch.equal(again[k], state[k])


def test_adapters_travel_as_float32_even_from_bfloat16():
    state = OrderedDict(w=torch.ones(3, 2, dtype=torch.bfloat16))
    record = state_to_record(state)
    assert record_to_state(record)["w"].dtype == torch.float32


def test_round_plan_round_trips_and_rejects_unknown_fields():
    plan = RoundPlan(
        run_id="r",
        round=2,
        total_rounds=5,
        local_steps=10,
        batch_size=32,
        learning_rate=0.01,
        max_length=128,
        eval_batch_size=32,
        model_fingerprint="ab" * 32,
        lora_rank=8,
        lora_alpha=16.0,
        lora_dropout=0.0,
        lora_ffa=True,
        lora_seed=0,
        dp_enabled=True,
        max_grad_norm=1.0,
        coordinator_jurisdiction="EU",
        cohort_size=6,
        target_epsilon=3.0,
        lora_target_modules=("c_attn",),
    )
    record = plan.to_record()
    assert "noise-multiplier" not in record  # None does not travel
    assert RoundPlan.from_record(record) == plan
    with pytest.raises(SchemaError, match="unknown fields"):
        RoundPlan.from_record({**record, "send-me-your-data": True})
    for name in ("sgd", "rmsprop"):
        assert RoundPlan.from_record(dataclasses.replace(plan, optimizer=name).to_record()).optimizer == name
    for hostile in ("lion", "rmsprop2", "sgd|adamw", "auto"):  # auto is resolved at config load, never sent
        with pytest.raises(SchemaError, match="optimizer"):
            RoundPlan.from_record({**record, "optimizer": hostile})


def test_weighted_mean_weights_by_units():
    a = OrderedDict(w=torch.tensor([1.0, 0.0]))
    b = OrderedDict(w=torch.tensor([0.0, 1.0]))
    mean = weighted_mean([a, b], [3, 1])
    assert torch.allclose(mean["w"], torch.tensor([0.75, 0.25]))
    new = apply_update(OrderedDict(w=torch.zeros(2), frozen=torch.ones(1)), mean, 2.0)
    assert torch.allclose(new["w"], torch.tensor([1.5, 0.5])) and torch.equal(new["frozen"], torch.ones(1))


@pytest.mark.parametrize(
    "update, message",
    [
        (OrderedDict(w=torch.zeros(2), extra=torch.zeros(1)), "unexpected \\['extra'\\]"),
        (OrderedDict(), "missing \\['w'\\]"),
        (OrderedDict(w=torch.zeros(3)), "expected float32\\(2,\\)"),
        (OrderedDict(w=torch.zeros(2, dtype=torch.float64)), "float64"),
        (OrderedDict(w=torch.tensor([float("nan"), 0.0])), "NaN"),
    ],
)
def test_malformed_updates_are_rejected(update, message):
    with pytest.raises(WireError, match=message):
        check_update(update, OrderedDict(w=torch.zeros(2)))


def _adapter_record(values: torch.Tensor, layout: bytes, **extra: torch.Tensor):
    from flwr.app import ArrayRecord

    arrays = {"values": values, "layout": torch.frombuffer(bytearray(layout), dtype=torch.uint8), **extra}
    return ArrayRecord(OrderedDict(arrays))


@pytest.mark.parametrize(
    "record, fragment",
    [
        (lambda: _adapter_record(torch.zeros(6), b'[["a", [2, 3]], ["a", [0]]]'), "repeats a tensor name"),
        (lambda: _adapter_record(torch.zeros(6), b'[["a", [2, 4]]]'), "describes 8 values; 6 arrived"),
        (lambda: _adapter_record(torch.zeros(6), b"not json"), "not JSON"),
        (lambda: _adapter_record(torch.zeros(6), b'[["a", [2, -3]]]'), "Malformed adapter layout entry"),
        (lambda: _adapter_record(torch.zeros(6), b'[["a", [6.0]]]'), "Malformed adapter layout entry"),
        (lambda: _adapter_record(torch.zeros(0), b'[["a", [0, 4294967296]]]'), "Malformed adapter layout entry"),
        (lambda: _adapter_record(torch.zeros(6, dtype=torch.float64), b'[["a", [6]]]'), "float32 vector"),
        (lambda: _adapter_record(torch.full((2,), float("nan")), b'[["a", [2]]]'), "NaN or infinite"),
        (lambda: _adapter_record(torch.zeros(2), b'[["a", [2]]]', extra=torch.zeros(1)), "exactly"),
    ],
)
def test_a_malformed_adapter_record_is_refused_naming_the_problem(record, fragment):
    with pytest.raises(WireError, match=fragment):
        record_to_state(record())


def test_an_adapter_travels_as_two_arrays_whatever_its_tensor_count():
    # Flower moves each array (and chunk) as its own request: a tensor per array cost seconds per message.
    record = state_to_record(lora_like_state())
    assert list(record) == ["values", "layout"]
