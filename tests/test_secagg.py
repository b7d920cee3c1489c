"""Secure aggregation: the primitives, the five-stage protocol, dropouts, and a coordinator that deviates."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.secagg.crypto import SecAggError, combine_secret, mask_stream, split_secret
from common.secagg.encoding import Quantization, adam_displacement_bound, flatten, layout_of, metric_slots, unflatten
from common.secagg.identity import Identity, Roster, RosterEntry
from common.secagg.protocol import ClientSession, Payload, ServerAggregation, mask_for

TAG = b"test-run|round-1|train"
PLAN = "ab" * 32
PARAMS = {"layout": [["w", [1000]]], "clip-range": 0.5, "levels": 4096}


class Federation:
    """Clients with roster identities and a coordinator, driven in memory; deviations are played by hand."""

    def __init__(self, nodes, regions=None, min_cohort=2):
        self.nodes = list(nodes)
        self.regions = regions or {n: "r" for n in self.nodes}
        self.identities = {n: Identity(Ed25519PrivateKey.generate(), Path("/keys")) for n in self.nodes}
        self.roster = Roster(RosterEntry(f"n{n}", self.regions[n], self.identities[n].public_key) for n in self.nodes)
        self.sessions = {n: ClientSession.start(TAG, n, f"n{n}", PLAN) for n in self.nodes}
        self.adverts = {n: s.advert(self.identities[n]) for n, s in self.sessions.items()}
        self.min_cohort = min_cohort

    def server(self, threshold, nodes=None):
        nodes = self.nodes if nodes is None else nodes
        return ServerAggregation(
            TAG, threshold, PLAN, {n: self.regions[n] for n in nodes}, {n: self.adverts[n] for n in nodes}
        )

    def share(self, n, threshold, adverts=None):
        adverts = list(self.adverts.values()) if adverts is None else adverts
        return self.sessions[n].share(adverts, threshold, self.roster, self.min_cohort)

    def confirm(self, survivors, signers):
        return {n: self.sessions[n].confirm(survivors, self.identities[n]) for n in signers}


def run_protocol(payloads, threshold, drop_after_keys=(), drop_after_share=(), drop_after_mask=(), regions=None):
    """Drive clients and server in memory; return the unmasked sum and everything the server received."""
    fed = Federation(payloads, regions)
    server = fed.server(threshold, [n for n in payloads if n not in drop_after_keys])
    received = [x for a in server.adverts.values() for x in (a.c_pk, a.s_pk, a.signature)]
    for n in sorted(server.adverts):
        if n in drop_after_share:
            continue
        shares, commitment = fed.share(n, threshold, list(server.adverts.values()))
        server.add_shares(n, shares, commitment)
        received += list(shares.values()) + [commitment]
    server.set_params(PARAMS)
    masked = {}
    for n in sorted(server.commitments):
        if n in drop_after_mask:
            continue
        masked[n] = fed.sessions[n].mask(*server.inbound_for(n), payloads[n], PARAMS)
        received.append(masked[n].to_bytes())
    survivors = sorted(masked)
    dropped = sorted(set(server.commitments) - set(masked))
    if len(survivors) < threshold:
        raise SecAggError(f"{len(survivors)} survivors, fewer than the threshold {threshold}")
    signatures = fed.confirm(survivors, survivors)
    unmask = {}
    for n in masked:
        unmask[n] = fed.sessions[n].unmask(survivors, dropped, signatures, fed.roster)
        received += list(unmask[n].values())
    return server.unmask(masked, unmask)[0], received, masked


def random_payloads(n, size=1000, seed=0):
    rng = np.random.default_rng(seed)
    return {
        100 + i: Payload(rng.integers(0, 2**20, size, dtype=np.uint32), rng.integers(0, 2**40, 3, dtype=np.uint64))
        for i in range(n)
    }


def plain_sum(payloads, nodes):
    data = sum(payloads[n].data.astype(np.uint64) for n in nodes) % 2**32
    metrics = sum(payloads[n].metrics.astype(object) for n in nodes)
    return data.astype(np.uint32), np.array([int(m) % 2**64 for m in metrics], dtype=np.uint64)


def test_masks_are_uniform_and_not_numpy_randomstate():
    key = bytes(range(32))
    stream = mask_stream(key, 400_000)
    assert stream.dtype == np.uint32
    # Uniform over the whole 2**32 range: chi-square over the 16 top-nibble buckets.
    counts = np.bincount(stream >> 28, minlength=16)
    chi2 = ((counts - len(stream) / 16) ** 2 / (len(stream) / 16)).sum()
    assert chi2 < 37.7  # p = 0.001 with 15 degrees of freedom
    assert abs(stream.mean() / 2**32 - 0.5) < 0.003
    # Not Flower 1.42's generator: numpy RandomState seeded with the key folded to 32 bits.
    folded = int.from_bytes(hashlib.sha256(key).digest()[:4], "little")
    numpy_masks = np.random.RandomState(folded).randint(0, 2**32 - 1, size=1000, dtype=np.int64)
    assert not np.array_equal(stream[:1000].astype(np.int64), numpy_masks)
    # The stream is keyed by all 256 bits: flipping the last bit changes it.
    assert not np.array_equal(mask_stream(key[:-1] + bytes([key[-1] ^ 1]), 1000), stream[:1000])
    assert mask_stream(key, 5, np.uint64).dtype == np.uint64


def test_session_secrets_carry_at_least_128_bits():
    fed = Federation([7, 8])
    session = fed.sessions[7]
    assert len(session.s_sk) * 8 >= 256 and len(session.c_sk) * 8 >= 256
    fed.share(7, 2)
    assert len(session.seeds) == 2 and all(len(seed) * 8 >= 128 for seed in session.seeds)
    assert ClientSession.start(TAG, 7, "n7", PLAN).s_sk != session.s_sk


def test_the_protocol_path_masks_with_the_chacha_generator():
    # Monkeypatch-free evidence: each masked input minus the true input is exactly the sum of masks
    # recomputed with mask_stream from the session's own keys, keyed by the round's transcript.
    from common.secagg.crypto import agree
    from common.secagg.protocol import self_mask

    payloads = random_payloads(3, size=64)
    fed = Federation(payloads)
    server = fed.server(2)
    for n in fed.nodes:
        server.add_shares(n, *fed.share(n, 2))
    server.set_params(PARAMS)
    for n in fed.nodes:
        s = fed.sessions[n]
        y = s.mask(*server.inbound_for(n), payloads[n], PARAMS)
        info = lambda purpose: TAG + b"|" + purpose + b"|" + server.transcript  # noqa: E731
        expected = self_mask(s.seeds, info(b"self"), 64, 3, 1)
        for peer in fed.nodes:
            if peer != n:
                pair = mask_for(agree(s.s_sk, fed.sessions[peer].s_pk, info(b"mask")), 64, 3)
                expected = expected.plus(pair, 1 if n < peer else -1)
        assert np.array_equal(y.plus(payloads[n], -1).data, expected.data)
        assert np.array_equal(y.plus(payloads[n], -1).metrics, expected.metrics)


def test_sum_is_exact_and_inputs_stay_hidden():
    payloads = random_payloads(5)
    total, received, masked = run_protocol(payloads, threshold=3)
    data, metrics = plain_sum(payloads, payloads)
    assert np.array_equal(total.data, data) and np.array_equal(total.metrics, metrics)
    for y in masked.values():
        for x in payloads.values():
            corr = np.corrcoef(y.data.astype(np.float64), x.data.astype(np.float64))[0, 1]
            assert abs(corr) < 0.15  # 1000 values: noise level is about 1/sqrt(1000) = 0.03


@pytest.mark.parametrize("dropped", [{101}, {101, 103}])  # one dropout; n - t = 2 dropouts
def test_dropouts_after_key_exchange_up_to_n_minus_t(dropped):
    payloads = random_payloads(5)
    total, _, _ = run_protocol(payloads, threshold=3, drop_after_share=set(), drop_after_mask=dropped)
    data, metrics = plain_sum(payloads, set(payloads) - dropped)
    assert np.array_equal(total.data, data) and np.array_equal(total.metrics, metrics)


def test_dropouts_before_sharing_are_simply_left_out():
    payloads = random_payloads(5)
    total, _, _ = run_protocol(payloads, threshold=3, drop_after_share={102})
    assert np.array_equal(total.data, plain_sum(payloads, set(payloads) - {102})[0])


def test_one_dropout_more_than_tolerated_fails_cleanly():
    payloads = random_payloads(5)
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        run_protocol(payloads, threshold=3, drop_after_mask={100, 101, 102})


def prepared(n_nodes=3, threshold=2, regions=None, size=16):
    """A federation whose clients have shared and masked: ready for confirm and unmask."""
    payloads = random_payloads(n_nodes, size=size)
    fed = Federation(payloads, regions)
    server = fed.server(threshold)
    for n in fed.nodes:
        server.add_shares(n, *fed.share(n, threshold))
    server.set_params(PARAMS)
    for n in fed.nodes:
        fed.sessions[n].mask(*server.inbound_for(n), payloads[n], PARAMS)
    return fed, server, payloads


def test_clients_refuse_requests_that_would_unmask_an_input():
    fed, _, _ = prepared()
    a, b, c = fed.nodes
    with pytest.raises(SecAggError, match="repeats nodes"):
        fed.sessions[a].confirm([a, a, b], fed.identities[a])  # duplicates padding the count
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        fed.sessions[a].confirm([a], fed.identities[a])
    signatures = fed.confirm([a, b, c], [a, b, c])
    with pytest.raises(SecAggError, match="dropout list"):
        fed.sessions[a].unmask([a, b, c], [b], signatures, fed.roster)  # b both survivor and dropped
    fed.sessions[a].unmask([a, b, c], [], signatures, fed.roster)
    with pytest.raises(SecAggError, match="out of order"):
        fed.sessions[a].unmask([a, b], [c], signatures, fed.roster)  # a second unmask could reveal b's seed and c's key


def test_tampered_share_is_detected():
    payloads = random_payloads(3, size=16)
    fed = Federation(payloads)
    server = fed.server(2)
    for n in fed.nodes:
        server.add_shares(n, *fed.share(n, 2))
    senders, blobs = server.inbound_for(fed.nodes[0])
    blobs[1] = blobs[1][:-1] + bytes([blobs[1][-1] ^ 1])
    fed.sessions[fed.nodes[0]].mask(senders, blobs, payloads[fed.nodes[0]], PARAMS)
    signatures = fed.confirm(fed.nodes, [fed.nodes[0]])
    for n in fed.nodes[1:]:
        fed.sessions[n].mask(*server.inbound_for(n), payloads[n], PARAMS)
    signatures.update(fed.confirm(fed.nodes, fed.nodes[1:]))
    with pytest.raises(SecAggError, match="authentication"):
        fed.sessions[fed.nodes[0]].unmask(fed.nodes, [], signatures, fed.roster)


def test_a_share_list_that_does_not_match_its_senders_is_refused():
    payloads = random_payloads(3, size=16)
    fed = Federation(payloads)
    server = fed.server(2)
    for n in fed.nodes:
        server.add_shares(n, *fed.share(n, 2))
    senders, blobs = server.inbound_for(fed.nodes[0])
    with pytest.raises(SecAggError, match="relayed 2 shares for 3 senders"):
        fed.sessions[fed.nodes[0]].mask(senders, blobs[:-1], payloads[fed.nodes[0]], PARAMS)


# -- a coordinator that deviates (issue 13) -----------------------------------------------------------


def test_duplicate_node_ids_or_identities_never_count_twice():
    fed = Federation([1, 2, 3, 4])
    adverts = list(fed.adverts.values())
    with pytest.raises(SecAggError, match="twice"):
        fed.share(1, 2, adverts + [adverts[1]])
    fed2, _, _ = prepared(n_nodes=4, threshold=3)
    a, b, *_ = fed2.nodes
    with pytest.raises(SecAggError, match="repeats nodes"):
        fed2.sessions[a].confirm([a, b, b], fed2.identities[a])


@pytest.mark.parametrize("n, threshold", [(6, 2), (6, 3), (4, 2), (3, 1)])
def test_a_threshold_at_or_below_half_is_refused_whatever_the_coordinator_asks(n, threshold):
    fed = Federation(range(1, n + 1))
    with pytest.raises(SecAggError, match="requires at least"):
        fed.share(1, threshold)


def test_a_threshold_below_the_policys_minimum_cohort_is_refused():
    fed = Federation(range(1, 7), min_cohort=5)
    with pytest.raises(SecAggError, match="minimum cohort 5"):
        fed.share(1, 4)


def test_keys_not_signed_by_a_roster_identity_are_refused():
    """Sybil peers and substituted keys: the coordinator holds no roster identity, so it cannot sign."""
    from common.secagg.protocol import Advert, advert_message

    fed = Federation([1, 2, 3])
    fake = Identity(Ed25519PrivateKey.generate(), Path("/keys"))
    c, s = ClientSession.start(TAG, 9, "n9", PLAN).c_pk, ClientSession.start(TAG, 9, "n9", PLAN).s_pk
    sybil = Advert(9, "n9", c, s, fake.sign(advert_message(TAG, 9, "n9", c, s)))
    with pytest.raises(SecAggError, match="not in this node's federation roster"):
        fed.share(1, 3, [*fed.adverts.values(), sybil])
    # The coordinator swaps node 2's mask key for one it holds: node 2's signature no longer verifies.
    swapped = Advert(2, "n2", fed.adverts[2].c_pk, s, fed.adverts[2].signature)
    with pytest.raises(SecAggError, match="does not verify"):
        fed.share(1, 2, [fed.adverts[1], swapped, fed.adverts[3]])
    # A valid advert replayed under another node id fails too (the id is signed).
    moved = Advert(5, "n2", fed.adverts[2].c_pk, fed.adverts[2].s_pk, fed.adverts[2].signature)
    with pytest.raises(SecAggError, match="does not verify"):
        fed.share(1, 2, [fed.adverts[1], moved, fed.adverts[3]])


def test_parameters_that_differ_for_one_node_fail_the_round_without_revealing_its_input():
    """Different quantisation levels for one node (the issue's attack): the node's masks are keyed by another
    transcript, so they do not cancel. Even a coordinator that removes the victim's self mask with the
    transcript it gave the victim is left with pairwise masks it cannot compute: noise, not the input."""
    from common.secagg.protocol import self_mask

    payloads = random_payloads(4, size=4000)
    fed = Federation(payloads)
    victim, honest = 101, [100, 102, 103]
    server = fed.server(3)
    for n in fed.nodes:
        server.add_shares(n, *fed.share(n, 3))
    server.set_params(PARAMS)
    masked = {
        n: fed.sessions[n].mask(
            *server.inbound_for(n), payloads[n], {**PARAMS, "levels": 2**31} if n == victim else PARAMS
        )
        for n in fed.nodes
    }
    signatures = fed.confirm(fed.nodes, fed.nodes)
    # The victim signed another transcript: it finds too few signatures on its own and refuses to unmask.
    with pytest.raises(SecAggError, match="1 survivors signed"):
        fed.sessions[victim].unmask(fed.nodes, [], signatures, fed.roster)
    shares = {n: fed.sessions[n].unmask(fed.nodes, [], signatures, fed.roster) for n in honest}
    total, _ = server.unmask(masked, shares)
    seeds = fed.sessions[victim].seeds  # revealed to the coordinator by the honest nodes' shares

    def victim_mask(transcript):
        return self_mask(seeds, TAG + b"|self|" + transcript, 4000, 3, 1)

    total = total.plus(victim_mask(server.transcript)).plus(victim_mask(fed.sessions[victim].transcript), -1)
    residue = (total.data.astype(np.int64) - plain_sum(payloads, honest)[0].astype(np.int64)) % 2**32
    assert not np.array_equal(residue, payloads[victim].data)
    corr = np.corrcoef(residue.astype(np.float64), payloads[victim].data.astype(np.float64))[0, 1]
    assert abs(corr) < 0.1  # uniform noise: 4000 values give |corr| ~ 0.016


def test_different_survivor_sets_to_different_clients_cannot_be_unmasked():
    """The consistency round: t signatures on one survivor set, and nobody signs twice."""
    fed, _, _ = prepared(n_nodes=5, threshold=3)
    a, b, c, d, e = fed.nodes
    first = fed.confirm([a, b, c, d, e], [a, b])  # a and b saw everyone survive
    second = fed.confirm([c, d, e], [c, d, e])  # c, d, e were told a and b dropped
    with pytest.raises(SecAggError, match="2 survivors signed"):
        fed.sessions[a].unmask([a, b, c, d, e], [], {**first, **second}, fed.roster)
    # With 3 signatures on [c, d, e], c reveals a's and b's mask keys (as dropped) and the seeds of c, d, e: that
    # is the sum of c, d, e. The seeds of a and b are only ever revealed on a set a and b signed, which never got
    # t signatures: their inputs stay masked. A signature copied under another survivor's name does not count.
    with pytest.raises(SecAggError, match="2 survivors signed"):
        fed.sessions[c].unmask([c, d, e], [a, b], {c: second[c], d: second[c], e: second[e]}, fed.roster)
    shares = fed.sessions[c].unmask([c, d, e], [a, b], second, fed.roster)
    assert set(shares) == {a, b, c, d, e}


def test_a_metric_slot_left_with_one_survivor_stays_masked_while_the_update_is_summed():
    """A dropout may leave one region with a single survivor: the update is still unmasked (dropouts up to n - t
    survive), but nobody reveals that slot's self-mask seeds, so its sums, that survivor's loss, stay hidden."""
    regions = {100: "eu", 101: "eu", 102: "us", 103: "us", 104: "us"}
    rng = np.random.default_rng(3)
    payloads = {
        n: Payload(rng.integers(0, 2**20, 64, dtype=np.uint32), rng.integers(0, 2**40, 5, dtype=np.uint64))
        for n in regions
    }  # 2 slots x 2 + counter
    fed = Federation(payloads, regions)
    server = fed.server(3)
    for n in fed.nodes:
        server.add_shares(n, *fed.share(n, 3))
    server.set_params(PARAMS)
    survivors = [100, 102, 103, 104]  # 101 drops: eu is left with 100 alone
    masked = {n: fed.sessions[n].mask(*server.inbound_for(n), payloads[n], PARAMS) for n in survivors}
    signatures = fed.confirm(survivors, survivors)
    shares = {n: fed.sessions[n].unmask(survivors, [101], signatures, fed.roster) for n in survivors}
    total, revealed = server.unmask(masked, shares)
    data, metrics = plain_sum(payloads, survivors)
    assert revealed == ["us"]
    assert np.array_equal(total.data, data)  # the update sum is exact
    assert np.array_equal(total.metrics[2:], metrics[2:])  # the us slot and the counter too
    assert not np.array_equal(total.metrics[:2], payloads[100].metrics[:2])  # eu: still masked


def test_metric_slots_never_isolate_one_client():
    assert metric_slots(["eu", "eu", "us", "us"]) == (["eu", "us"], ["eu", "eu", "us", "us"])
    slots, of = metric_slots(["eu", "eu", "us", "sg", "sg", "sg"])  # us alone: the smallest region joins it
    assert slots == ["sg", "other-regions"] and of.count("other-regions") == 3
    assert metric_slots(["us", "sg"]) == (["other-regions"], ["other-regions", "other-regions"])
    for regions in (["a", "b", "b", "c", "c"], ["a", "a", "b"], ["a", "b", "c"]):
        _, of = metric_slots(regions)
        assert all(of.count(slot) >= 2 for slot in of)


def test_session_survives_the_record_round_trip():
    fed, _, _ = prepared()
    s = fed.sessions[fed.nodes[0]]
    assert ClientSession.from_record(s.to_record()) == s


def test_shamir_needs_the_threshold():
    secret = bytes(range(32))
    shares = split_secret(secret, 3, 5)
    assert combine_secret({1: shares[0], 3: shares[2], 5: shares[4]}) == secret
    assert combine_secret({1: shares[0], 2: shares[1]}) != secret


def test_quantized_weighted_mean_is_within_one_step():
    rng = np.random.default_rng(1)
    updates = [rng.normal(0, 0.01, 5000).astype(np.float32) for _ in range(6)]
    weights = [456, 549, 582, 446, 499, 450]
    q = Quantization.for_cohort(adam_displacement_bound(1e-2, 10), sum(weights))
    total = np.zeros(5000, dtype=np.uint32)
    for u, w in zip(updates, weights, strict=True):
        encoded, clipped = q.encode(u, w)
        assert clipped == 0
        total += encoded
    mean = q.decode(total, sum(weights))
    plain = sum(w * u.astype(np.float64) for u, w in zip(updates, weights, strict=True)) / sum(weights)
    error = np.abs(mean - plain).max()
    assert error <= q.step + 1e-9
    assert error <= 1e-3 * np.abs(plain).max()


def test_adam_bound_covers_a_real_adam_trajectory():
    p = torch.zeros(1000, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        p.grad = torch.randn(1000, generator=g) * torch.rand(1000, generator=g) * 10
        opt.step()
    assert p.detach().abs().max() <= adam_displacement_bound(1e-2, 10)


def test_flatten_round_trip():
    state = {"b": torch.randn(2, 3), "a": torch.randn(4)}
    layout = layout_of(state)
    back = unflatten(flatten(state, layout), layout)
    assert all(torch.equal(back[k], state[k]) for k in state)
