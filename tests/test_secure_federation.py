"""Secure aggregation inside real federations (in process): what the coordinator receives,
exactness against plain FedAvg, dropouts, and a clean failure beyond the threshold."""

import numpy as np
import pytest
import torch

from client import secure
from common.secagg.encoding import Quantization, adam_displacement_bound, flatten, layout_of
from server.aggregation import weighted_mean
from tests.conftest import edit_policy
from tests.inprocess import run_federation

# Six clients in three regions: threshold ceil(0.6 * 6) = 4 tolerates two dropouts.
# No memorisation audit: these tests check what the secure sum reveals and how rounds end, not the audit.
SIX = [
    "regions=[eu,us,sg]",
    "federation.rounds=1",
    "federation.local_steps=3",
    "secure_aggregation.stage_timeout_s=1",
    "audit.enabled=false",
]


def capture_updates(grid, into):
    """Record each node's true update from its own state after it trained (the test's view, not the coordinator's)."""

    def after(msg, context):
        if msg.metadata.message_type == "train" and secure.UPDATE in context.state:
            into[msg.metadata.dst_node_id] = (
                context.state[secure.UPDATE].to_torch_state_dict(),
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
        adam_displacement_bound(cfg.federation.learning_rate, cfg.federation.local_steps),
        sum(w for _, w in updates.values()),
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
    step = cfg.federation.server_learning_rate  # the server's step on the mean, resolved at config load
    for name, mean in plain.items():
        got, expected = after[name] - before[name], step * mean
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
    for name, mean in plain.items():
        expected = cfg.federation.server_learning_rate * mean
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


@pytest.mark.heavy(seconds=20)
def test_one_dropout_too_many_skips_the_round_cleanly_and_the_run_goes_on(small_overrides):
    def prepare(grid):
        grid.lose |= {(n, "train.secagg_mask", "1") for n in sorted(grid.contexts)[:3]}

    cfg, run, summary, _ = run_federation(
        small_overrides + SIX + ["federation.rounds=2"],
        prepare_grid=prepare,
    )
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
    # The run went on, and says honestly that a round fell short.
    assert summary["status"] == "partial" and summary["rounds_completed"] == 2
    assert summary["not_contributing"] == ["round 1 was not aggregated"]


@pytest.mark.heavy(seconds=22)
def test_secure_upload_is_compact(small_overrides, config_dir):
    base = small_overrides + ["federation.rounds=1", "federation.local_steps=2", "audit.enabled=false"]
    _, secure_run, _, _ = run_federation(base, run_name="secure")
    for region in ("eu", "us"):  # regions that accept plaintext updates, for the comparison
        edit_policy(config_dir, region, "transfers.require_secure_aggregation", False)
    _, plain_run, _, _ = run_federation(base + ["secure_aggregation.enabled=false"], run_name="plain")
    secure_bytes = secure_run.read_metrics()[1]["upload_bytes_per_client"]
    plain_bytes = plain_run.read_metrics()[1]["upload_bytes_per_client"]
    # Masked values are packed 4 bytes each, like float32; the protocol adds keys and shares.
    assert 0.9 * plain_bytes < secure_bytes <= 1.5 * plain_bytes


# -- a coordinator that deviates (issue 13), through the real ClientApp --------------------------------------


def tampering(monkeypatch, tamper):
    """Make the real coordinator send every secure-aggregation stage message through `tamper`."""
    from server.coordinator import Coordinator

    real = Coordinator._stage_exchange

    def stage_exchange(self, round_number):
        exchange = real(self, round_number)

        def hostile(node_ids, message_type, content_for, timeout):
            node_ids = list(node_ids)
            return exchange(
                node_ids, message_type, lambda n: tamper(message_type, n, node_ids, content_for(n)), timeout
            )

        return hostile

    monkeypatch.setattr(Coordinator, "_stage_exchange", stage_exchange)


def changed(content, **fields):
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({"secagg": ConfigRecord({**dict(content["secagg"]), **fields})})


def fake_adverts(count):
    """Peers the coordinator made up: valid-looking keys, signed by identities no roster lists."""
    from pathlib import Path

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from common.secagg.identity import Identity
    from common.secagg.protocol import ClientSession, advert_message

    out = []
    for i in range(count):
        node_id, name = 9000 + i, f"eu-{9 + i}"
        s = ClientSession.start(b"x", node_id, name, "0" * 64)
        fake = Identity(Ed25519PrivateKey.generate(), Path("/nowhere"))
        out.append((node_id, name, s.c_pk, s.s_pk, fake.sign(advert_message(b"x", node_id, name, s.c_pk, s.s_pk))))
    return out


def duplicate_survivors(kind, node, nodes, content):
    if kind.endswith(("secagg_confirm", "secagg_unmask")):
        survivors = list(content["secagg"]["survivors"])
        return changed(content, survivors=survivors[:2] + [survivors[0]] * 2)
    return content


def duplicate_ids_and_low_threshold(kind, node, nodes, content):
    if kind.endswith("secagg_shares"):
        c = content["secagg"]
        return changed(
            content,
            **{k: list(c[k]) + [list(c[k])[0]] for k in ("node-ids", "names", "c-pks", "s-pks", "signatures")},
            threshold=2,
        )
    return content


def low_threshold(kind, node, nodes, content):
    if kind.endswith("secagg_shares"):
        return changed(content, threshold=2)  # 2 of 4: two disjoint pairs could each unmask
    return content


def other_levels_for_one_node(kind, node, nodes, content):
    if kind == "train.secagg_mask" and node == min(nodes):
        return changed(content, levels=int(content["secagg"]["levels"]) // 1024)
    return content


def sybil_peers(kind, node, nodes, content):
    if kind.endswith("secagg_shares"):
        c = content["secagg"]
        fakes = fake_adverts(2)
        columns = {
            k: list(c[k]) + [f[i] for f in fakes]
            for i, k in enumerate(("node-ids", "names", "c-pks", "s-pks", "signatures"))
        }
        return changed(content, **columns)
    return content


def split_survivor_sets(kind, node, nodes, content):
    if kind.endswith("secagg_confirm"):
        survivors = sorted(content["secagg"]["survivors"])
        return changed(content, survivors=survivors if node in survivors[:2] else survivors[1:])
    return content


@pytest.mark.parametrize(
    "tamper, refusal",
    [
        (duplicate_survivors, "2 client(s) in this aggregation"),  # duplicates never count towards the cohort
        (duplicate_ids_and_low_threshold, "must not repeat"),
        (low_threshold, "this node requires at least 3"),
        (other_levels_for_one_node, "survivors signed this survivor set"),
        (sybil_peers, "not in this node's federation roster"),
        (split_survivor_sets, "survivors signed this survivor set"),
    ],
)
def test_a_deviating_coordinator_recovers_nothing_and_the_round_fails_cleanly(
    small_overrides, monkeypatch, tamper, refusal
):
    updates = {}
    tampering(monkeypatch, tamper)
    cfg, run, summary, grid = run_federation(
        small_overrides
        + [
            "federation.rounds=1",
            "federation.local_steps=2",
            "audit.enabled=false",
            "secure_aggregation.stage_timeout_s=1",
        ],
        prepare_grid=lambda g: capture_updates(g, updates),
    )
    row = run.read_metrics()[1]
    assert row["aggregated"] is False  # the round failed...
    from safetensors.torch import load_file

    before = initial_state(cfg)
    after = load_file(str(run.checkpoints_dir / "round-0001" / "adapter_model.safetensors"))
    assert all(torch.equal(after[k], before[k]) for k in before)  # ...and left the adapter as it was
    assert "train_loss" not in row  # no loss came back either
    # Nodes that saw the deviation refused it, and say why in their own audit logs.
    from tests.inprocess import node_audit_entries

    reasons = [
        e["reason"]
        for name in ("eu-1", "eu-2", "us-1", "us-2")
        for e in node_audit_entries(cfg, name)
        if e["action"] == "egress" and e["decision"] == "refusal_sent"
    ]
    assert any(refusal in r for r in reasons), reasons
    # Nothing the coordinator received, read as 32-bit words, correlates with any node's true update.
    layout = layout_of(next(iter(updates.values()))[0])
    for update, _ in updates.values():
        truth = flatten(update, layout).astype(np.float64)
        for reply in grid.received:
            for record in reply.content.values() if reply.has_content() else []:
                for value in record.values():
                    for item in value if isinstance(value, list) else [value]:
                        if isinstance(item, bytes) and len(item) >= 4 * len(truth):
                            words = np.frombuffer(item[: 4 * len(truth)], dtype="<u4").astype(np.float64)
                            assert abs(np.corrcoef(words, truth)[0, 1]) < 0.2
