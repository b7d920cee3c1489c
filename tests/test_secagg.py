"""Secure aggregation: the primitives, the four-stage protocol, dropouts and refusals."""

import hashlib

import numpy as np
import pytest
import torch

from common.secagg.crypto import SecAggError, combine_secret, mask_stream, split_secret
from common.secagg.encoding import Quantization, adam_displacement_bound, flatten, layout_of, unflatten
from common.secagg.protocol import ClientSession, Payload, ServerAggregation, mask_for

TAG = b"test-run|round-1|train"


def run_protocol(payloads, threshold, drop_after_keys=(), drop_after_share=(), drop_after_mask=()):
    """Drive clients and server in memory; return the unmasked sum and everything the server received."""
    server = ServerAggregation(TAG, threshold)
    sessions = {n: ClientSession.start(TAG, n) for n in payloads}
    received = []
    for n, s in sessions.items():
        if n not in drop_after_keys:
            server.keys[n] = (s.c_pk, s.s_pk)
            received += [s.c_pk, s.s_pk]
    ids, c_pks, s_pks = server.key_lists()
    for n in ids:
        if n in drop_after_share:
            continue
        shares, commitment = sessions[n].share(ids, c_pks, s_pks, threshold)
        server.add_shares(n, shares, commitment)
        received += list(shares.values()) + [commitment]
    masked = {}
    for n in sorted(server.commitments):
        if n in drop_after_mask:
            continue
        senders, blobs = server.inbound_for(n)
        masked[n] = sessions[n].mask(senders, blobs, payloads[n])
        received.append(masked[n].to_bytes())
    dropped = sorted(set(server.commitments) - set(masked))
    unmask = {}
    for n in masked:
        unmask[n] = sessions[n].unmask(sorted(masked), dropped)
        received += list(unmask[n].values())
    return server.unmask(masked, unmask), received, masked


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
    session = ClientSession.start(TAG, 7)
    assert len(session.s_sk) * 8 >= 256 and len(session.c_sk) * 8 >= 256
    session.share([7, 8], [session.c_pk, ClientSession.start(TAG, 8).c_pk], [session.s_pk, ClientSession.start(TAG, 8).s_pk], 2)
    assert len(session.seed) * 8 >= 128
    assert ClientSession.start(TAG, 7).s_sk != session.s_sk


def test_the_protocol_path_masks_with_the_chacha_generator():
    # Monkeypatch-free evidence: each masked input minus the true input is exactly the sum of
    # masks recomputed with mask_stream from the session's own keys.
    from common.secagg.crypto import agree, derive_key

    payloads = random_payloads(3, size=64)
    server = ServerAggregation(TAG, 2)
    sessions = {n: ClientSession.start(TAG, n) for n in payloads}
    for n, s in sessions.items():
        server.keys[n] = (s.c_pk, s.s_pk)
    ids, c_pks, s_pks = server.key_lists()
    for n in ids:
        server.add_shares(n, *sessions[n].share(ids, c_pks, s_pks, 2))
    for n in ids:
        y = sessions[n].mask(*server.inbound_for(n), payloads[n])
        s = sessions[n]
        expected = mask_for(derive_key(s.seed, TAG + b"|self"), 64, 3)
        for peer in ids:
            if peer != n:
                pair = mask_for(agree(s.s_sk, sessions[peer].s_pk, TAG + b"|mask"), 64, 3)
                expected = expected.plus(pair, 1 if n < peer else -1)
        assert np.array_equal(y.plus(payloads[n], -1).data, expected.data)
        assert np.array_equal(y.plus(payloads[n], -1).metrics, expected.metrics)


def test_sum_is_exact_and_inputs_stay_hidden():
    payloads = random_payloads(5)
    total, received, masked = run_protocol(payloads, threshold=3)
    data, metrics = plain_sum(payloads, payloads)
    assert np.array_equal(total.data, data) and np.array_equal(total.metrics, metrics)
    for n, y in masked.items():
        for m, x in payloads.items():
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


def test_clients_refuse_requests_that_would_unmask_an_input():
    payloads = random_payloads(3, size=16)
    server = ServerAggregation(TAG, 2)
    sessions = {n: ClientSession.start(TAG, n) for n in payloads}
    for n, s in sessions.items():
        server.keys[n] = (s.c_pk, s.s_pk)
    ids, c_pks, s_pks = server.key_lists()
    for n in ids:
        server.add_shares(n, *sessions[n].share(ids, c_pks, s_pks, 2))
    for n in ids:
        sessions[n].mask(*server.inbound_for(n), payloads[n])
    a, b, c = ids
    with pytest.raises(SecAggError, match="both survivor and dropped"):
        sessions[a].unmask([a, b, c], [b])
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        sessions[a].unmask([a], [b, c])
    sessions[a].unmask([a, b, c], [])
    with pytest.raises(SecAggError, match="out of order"):
        sessions[a].unmask([a, b], [c])  # a second unmask could reveal b's seed and c's key


def test_tampered_share_is_detected():
    payloads = random_payloads(3, size=16)
    server = ServerAggregation(TAG, 2)
    sessions = {n: ClientSession.start(TAG, n) for n in payloads}
    for n, s in sessions.items():
        server.keys[n] = (s.c_pk, s.s_pk)
    ids, c_pks, s_pks = server.key_lists()
    for n in ids:
        server.add_shares(n, *sessions[n].share(ids, c_pks, s_pks, 2))
    senders, blobs = server.inbound_for(ids[0])
    blobs[1] = blobs[1][:-1] + bytes([blobs[1][-1] ^ 1])
    sessions[ids[0]].mask(senders, blobs, payloads[ids[0]])
    with pytest.raises(SecAggError, match="authentication"):
        sessions[ids[0]].unmask(ids, [])


def test_session_survives_the_record_round_trip():
    s = ClientSession.start(TAG, 3)
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
    for u, w in zip(updates, weights):
        encoded, clipped = q.encode(u, w)
        assert clipped == 0
        total += encoded
    mean = q.decode(total, sum(weights))
    plain = sum(w * u.astype(np.float64) for u, w in zip(updates, weights)) / sum(weights)
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
