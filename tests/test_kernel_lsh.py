"""LSH attention (Reformer, Kitaev et al. 2020) against float64 references with explicit masks.

The strongest check rebuilds, from the hash orders alone, which (query, key) pairs meet in some
round, and compares with dense softmax attention restricted to exactly those pairs: the
sorting, chunking, look-back, de-duplication across rounds and log-sum-exp merge must all be
right for that to hold to 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from conftest import padding_mask, random_qkv

from surgeon.attention.interface import dense_attention
from surgeon.attention.kernels.lsh import lsh_attention, lsh_cost, lsh_orders


def qkv(b=2, h=3, h_kv=3, n=50, d=8, seed=0):
    return random_qkv(b, h, h_kv, n, d, seed)


def met_pairs(orders, bucket_size, n):
    """(B, H, n, n) bool: query i and key j share a chunk, or j's chunk is just before i's."""
    big_n = orders[0][0].shape[-1]
    chunks = big_n // bucket_size
    met = None
    for q_order, k_order in orders:
        ranks = torch.arange(big_n).expand_as(q_order)
        cq = torch.empty_like(q_order).scatter_(-1, q_order, ranks) // bucket_size
        ck = torch.empty_like(k_order).scatter_(-1, k_order, ranks) // bucket_size
        gap = (cq[..., :, None] - ck[..., None, :]) % chunks
        now = (gap == 0) | (gap == 1) if chunks > 1 else torch.ones_like(gap, dtype=torch.bool)
        met = now if met is None else met | now
    return met[..., :n, :n]


def restricted_dense(q, k, v, allowed, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("lengths", [None, [50, 31]])
@pytest.mark.parametrize("h_kv", [3, 1])
def test_one_chunk_is_dense(lengths, h_kv):
    q, k, v = qkv(h_kv=h_kv)
    mask = None if lengths is None else padding_mask(2, 50, lengths)
    out = lsh_attention(q, k, v, n_hashes=3, bucket_size=64, seed=1, key_padding_mask=mask, scaling=0.35)
    ref = dense_attention(q, k, v, key_padding_mask=mask, scaling=0.35, dropout=0.0, causal=False)
    rows = slice(None) if lengths is None else slice(0, 31)  # padded query rows are unspecified
    torch.testing.assert_close(out[..., rows, :], ref[..., rows, :], rtol=1e-10, atol=1e-10)


def test_two_chunks_are_dense():
    q, k, v = qkv(n=40)
    out = lsh_attention(q, k, v, n_hashes=2, bucket_size=20, seed=0, key_padding_mask=None, scaling=0.3)
    ref = dense_attention(q, k, v, key_padding_mask=None, scaling=0.3, dropout=0.0, causal=False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_hashes,bucket_size", [(1, 8), (2, 8), (4, 5), (3, 16)])
@pytest.mark.parametrize("lengths", [None, [50, 29]])
@pytest.mark.parametrize("h_kv", [3, 1])
def test_equals_dense_restricted_to_the_pairs_that_met(n_hashes, bucket_size, lengths, h_kv):
    q, k, v = qkv(h_kv=h_kv)
    mask = None if lengths is None else padding_mask(2, 50, lengths)
    kw = dict(n_hashes=n_hashes, bucket_size=bucket_size, seed=7, key_padding_mask=mask)
    out = lsh_attention(q, k, v, scaling=0.4, **kw)
    allowed = met_pairs(lsh_orders(q, k.repeat_interleave(3 // h_kv, 1), **kw), bucket_size, 50)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    ref = restricted_dense(q, k, v, allowed, 0.4)
    real = torch.ones(2, 50, dtype=torch.bool) if mask is None else mask
    torch.testing.assert_close(out[real[:, None].expand(-1, 3, -1)], ref[real[:, None].expand(-1, 3, -1)],
                               rtol=1e-10, atol=1e-10)  # fmt: skip
    assert not allowed.all(), "the case must actually be sparse"


def test_padded_keys_never_attended():
    q, k, v = qkv(b=1, n=64)
    mask = padding_mask(1, 64, [41])
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 41:], v2[:, :, 41:] = 30.0, 1e4
    kw = dict(n_hashes=3, bucket_size=8, seed=2, key_padding_mask=mask, scaling=0.3)
    a = lsh_attention(q, k, v, **kw)[:, :, :41]
    b = lsh_attention(q, k2, v2, **kw)[:, :, :41]
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert b.abs().max() < 100


def test_error_falls_as_hashes_grow():
    # Statistical: average over 6 fixed seeds of inputs and rotations; n=256, 16 chunks of 16.
    errors = {}
    for n_hashes in (1, 2, 4, 8):
        total = 0.0
        for seed in range(6):
            q, k, v = qkv(b=1, h=2, h_kv=2, n=256, d=16, seed=seed)
            ref = dense_attention(q, k, v, key_padding_mask=None, scaling=0.5, dropout=0.0, causal=False)
            out = lsh_attention(q, k, v, n_hashes=n_hashes, bucket_size=16, seed=100 + seed,
                                key_padding_mask=None, scaling=0.5)  # fmt: skip
            total += ((out - ref).norm() / ref.norm()).item()
        errors[n_hashes] = total / 6
    assert errors[1] > errors[2] > errors[4] > errors[8], errors
    assert errors[8] < 0.6 * errors[1], errors


def test_shared_qk_one_chunk_is_reformer_formula():
    # Reformer §2: keys are the unit-normalised queries; a token attends to itself only if it
    # has nothing else to attend to (here: a large negative bias on the diagonal).
    q, _, v = qkv(b=1, n=20)
    out = lsh_attention(q, q, v, n_hashes=2, bucket_size=32, seed=0, key_padding_mask=None,
                        scaling=0.3, shared_qk=True)  # fmt: skip
    k = q / q.norm(dim=-1, keepdim=True)
    scores = (q @ k.transpose(-1, -2)) * 0.3 + torch.eye(20, dtype=torch.float64) * -1e5
    torch.testing.assert_close(out, scores.softmax(-1) @ v, rtol=1e-10, atol=1e-10)


def test_same_seed_same_output_and_other_seed_differs():
    q, k, v = qkv(n=64)
    kw = dict(n_hashes=2, bucket_size=8, key_padding_mask=None, scaling=0.3)
    a, b = lsh_attention(q, k, v, seed=3, **kw), lsh_attention(q, k, v, seed=3, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, lsh_attention(q, k, v, seed=4, **kw))


@pytest.mark.parametrize("kw,message", [
    (dict(n_hashes=0, bucket_size=8), "must be positive"),
    (dict(n_hashes=2, bucket_size=0), "must be positive"),
])  # fmt: skip
def test_bad_parameters(kw, message):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=message):
        lsh_attention(q, k, v, seed=0, key_padding_mask=None, scaling=1.0, **kw)


def test_needs_self_attention_lengths():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="same length"):
        lsh_attention(q[:, :, :1], k, v, n_hashes=1, bucket_size=8, seed=0,
                      key_padding_mask=None, scaling=1.0)  # fmt: skip


def test_cost_linear_in_n_and_hashes():
    base = lsh_cost(4096, 12, 64, 4, 64)
    assert lsh_cost(8192, 12, 64, 4, 64)["flops"] > 1.9 * base["flops"]
    assert lsh_cost(8192, 12, 64, 4, 64)["flops"] < 2.1 * base["flops"]
    assert lsh_cost(4096, 12, 64, 8, 64)["flops"] == 2 * base["flops"]


def test_gradients_match_the_restricted_dense_reference():
    # Training through LSH: the merge of rounds depends on each round's log-sum-exp, so its
    # gradient must reach Q and K too (the fused kernel's backward alone would drop it).
    q, k, v = qkv(n=40)
    mask = padding_mask(2, 40, [40, 29])
    kw = dict(n_hashes=3, bucket_size=8, seed=1, key_padding_mask=mask)
    weight = torch.randn(2, 3, 40, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    weight = weight * mask[:, None, :, None]  # padded query rows are unspecified
    allowed = met_pairs(lsh_orders(q, k, **kw), 8, 40) & mask[:, None, None, :]
    grads = []
    for fn in (lambda a, b, c: lsh_attention(a, b, c, scaling=0.4, **kw),
               lambda a, b, c: restricted_dense(a, b, c, allowed, 0.4)):  # fmt: skip
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        (fn(*leaves) * weight).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
