"""Secure aggregation inside real federations (in process): what the coordinator receives,
exactness against plain FedAvg, dropouts, and a clean failure beyond the threshold."""

import numpy as np
import pytest
import torch

from client import secure
from common.secagg.encoding import Quantization, adam_displacement_bound, flatten, layout_of
from common.wire import record_to_state
from server.aggregation import weighted_mean
from tests.conftest import edit_policy
from tests.inprocess import run_federation

# Six clients in three regions: threshold ceil(0.6 * 6) = 4 tolerates two dropouts.
SIX = ["regions=[eu,us,sg]", "federation.rounds=1", "federation.local_steps=3", "secure_aggregation.stage_timeout_s=1"]


def capture_updates(grid, into):
    """Record each node's true update from its own state after it trained (the test's view, not the coordinator's)."""

    def after(msg, context):
        if msg.metadata.message_type == "train" and secure.UPDATE in context.state:
            into[msg.metadata.dst_node_id] = (
                record_to_state(context.state[secure.UPDATE]),
                int(context.state[secure.CONTRIBUTION]["units"]),
            )

    grid.after_delivery = after


def initial_state(cfg):
    from server.coordinator import ServerModel

    return ServerModel(cfg).initial_state()


def test_coordinator_learns_the_sum_and_nothing_else(small_overrides):
    updates = {}
    cfg, run, summary, grid = run_federation(small_overrides + SIX, prepare_grid=lambda g: capture_updates(g, updates))
    assert len(updates) == 6
    layout = layout_of(next(iter(updates.values()))[0])
    truths = {n: flatten(u, layout).astype(np.float64) for n, (u, _) in updates.items()}
    n_params = len(next(iter(truths.values())))
    # The test has power: the same update quantized but not masked is plainly recognisable.
    quantization = Quantization.for_cohort(
        adam_displacement_bound(cfg.federation.learning_rate, cfg.federation.local_steps), sum(w for _, w in updates.values())
    )
    node, (update, weight) = next(iter(updates.items()))
    unmasked = quantization.encode(truths[node], weight)[0].astype(np.float64)
    assert np.corrcoef(unmasked, truths[node])[0, 1] > 0.99
    # Every byte string the coordinator received that is long enough to hold an update, read
    # as 32-bit words, is uncorrelated with every client's true update.
    seen = 0
    for reply in grid.received:
        if not reply.has_content():
            continue
        for record in reply.content.values():
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes) and len(item) >= 4 * n_params:
                        words = np.frombuffer(item[: 4 * (len(item) // 4)], dtype="<u4").astype(np.float64)
                        for truth in truths.values():
                            k = min(len(words), len(truth))
                            assert abs(np.corrcoef(words[:k], truth[:k])[0, 1]) < 0.05
                        seen += 1
    assert seen >= 6  # at least every masked input was checked
    # ...while the unmasked sum is right: the new global adapter is plain weighted FedAvg.
    before = initial_state(cfg)
    from safetensors.torch import load_file

    after = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
    plain = weighted_mean([u for u, _ in updates.values()], [w for _, w in updates.values()])
    for name, expected in plain.items():
        got = after[name] - before[name]
        assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
    rows = run.read_metrics()
    assert rows[1]["clipped_values"] == 0 and rows[1]["clients_trained"] == 6


@pytest.mark.parametrize("lost", [1, 2])  # one dropout, and n - threshold = 2 dropouts
def test_round_survives_dropouts_after_key_exchange(small_overrides, lost):
    updates = {}

    def prepare(grid):
        capture_updates(grid, updates)
        victims = sorted(grid.contexts)[:lost]
        grid.lose |= {(n, "train.secagg_mask", "1") for n in victims}

    cfg, run, summary, grid = run_federation(small_overrides + SIX, prepare_grid=prepare)
    row = run.read_metrics()[1]
    assert row["aggregated"] and row["clients_trained"] == 6 - lost and len(row["clients_dropped"]) == lost
    victims = sorted(grid.contexts)[:lost]
    survivors = [n for n in updates if n not in victims]
    plain = weighted_mean([updates[n][0] for n in survivors], [updates[n][1] for n in survivors])
    before = initial_state(cfg)
    from safetensors.torch import load_file

    after = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
    for name, expected in plain.items():
        assert ((after[name] - before[name]) - expected).abs().max() <= 1e-3 * expected.abs().max()


def test_a_lost_node_is_reported_as_failed_never_as_refused(small_overrides):
    """A node Flower reports unavailable did not refuse anything: the round shows it as failed."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    from server.simulation import render_event

    def prepare(grid):
        victim = sorted(grid.contexts)[0]
        deliver = grid.client_app

        def client_app(msg, context):
            if msg.metadata.dst_node_id == victim and msg.metadata.message_type == "train":
                return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), reply_to=msg)
            return deliver(msg, context)

        grid.client_app = client_app

    cfg, run, summary, _ = run_federation(small_overrides + SIX, prepare_grid=prepare)
    row = run.read_metrics()[1]
    assert row["aggregated"] and row["clients_trained"] == 5
    assert row["clients_refused"] == [] and len(row["clients_failed"]) == 1
    events = run.read_events()
    assert not [e for e in events if e["event"] == "node_refused"]
    failed = [e for e in events if e["event"] == "node_failed"]
    assert [e["node"] for e in failed] == row["clients_failed"] and failed[0]["reason"] == "Node Unavailable"
    line = render_event(failed[0], cfg)
    assert "REFUSED" not in line and "not a refusal" in line


def test_one_dropout_too_many_skips_the_round_cleanly_and_the_run_goes_on(small_overrides):
    def prepare(grid):
        grid.lose |= {(n, "train.secagg_mask", "1") for n in sorted(grid.contexts)[:3]}

    cfg, run, summary, _ = run_federation(small_overrides + SIX[:-3] + ["federation.rounds=2", "federation.local_steps=3",
                                                                      "secure_aggregation.stage_timeout_s=1"],
                                          prepare_grid=prepare)
    rows = run.read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["aggregated"] is False and rows[2]["aggregated"] is True
    skipped = [e for e in run.read_events() if e["event"] == "round_skipped"]
    assert len(skipped) == 1 and "fewer than the threshold 4" in skipped[0]["reason"]
    # Round 1 left the global adapter as it was: its checkpoint equals the initial adapter.
    from safetensors.torch import load_file

    before = initial_state(cfg)
    after_round_1 = load_file(str(run.checkpoints_dir / "round-0001" / "adapter_model.safetensors"))
    assert all(torch.equal(after_round_1[k], before[k]) for k in before)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2


def test_secure_upload_is_compact(small_overrides, config_dir):
    base = small_overrides + ["federation.rounds=1", "federation.local_steps=2"]
    _, secure_run, _, _ = run_federation(base, run_name="secure")
    for region in ("eu", "us"):  # regions that accept plaintext updates, for the comparison
        edit_policy(config_dir, region, "transfers.require_secure_aggregation", False)
    _, plain_run, _, _ = run_federation(base + ["secure_aggregation.enabled=false"], run_name="plain")
    secure_bytes = secure_run.read_metrics()[1]["upload_bytes_per_client"]
    plain_bytes = plain_run.read_metrics()[1]["upload_bytes_per_client"]
    # Masked values are packed 4 bytes each, like float32; the protocol adds keys and shares.
    assert 0.9 * plain_bytes < secure_bytes <= 1.5 * plain_bytes
