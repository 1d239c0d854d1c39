"""Linformer kernel (Wang et al. 2020) against float64 references with explicit masks."""

from __future__ import annotations

import pytest
import torch
from conftest import padding_mask, random_qkv

from surgeon.attention.interface import dense_attention
from surgeon.attention.kernels.linformer import (
    linformer_attention,
    linformer_cost,
    random_projection,
    segment_mean_projection,
)


def qkv(b=2, h=4, h_kv=4, n=24, d=8, seed=0):
    return random_qkv(b, h, h_kv, n, d, seed)


def reference(q, k, v, e, f, mask, scale):
    """softmax(Q (E K)ᵀ s) (F V), padded keys zeroed, slots with no real support masked."""
    n = k.shape[2]
    e, f = e[:, :n].double(), f[:, :n].double()
    keep = mask[:, None, :, None].double()  # (B, 1, n, 1)
    pk, pv = e @ (k * keep), f @ (v * keep)  # (B, H_kv, k, D)
    groups = q.shape[1] // k.shape[1]
    pk, pv = pk.repeat_interleave(groups, 1), pv.repeat_interleave(groups, 1)
    live = (mask.double() @ (e.abs() + f.abs()).T) > 0  # (B, k)
    scores = (q @ pk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ pv


def test_identity_projection_is_dense():
    q, k, v = qkv(n=24)
    eye = torch.eye(24, dtype=torch.float64)
    out = linformer_attention(q, k, v, eye, eye, key_padding_mask=None, scaling=0.3)
    ref = dense_attention(q, k, v, key_padding_mask=None, scaling=0.3, dropout=0.0, causal=False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_identity_projection_with_padding_is_dense_with_padding():
    q, k, v = qkv(n=24)
    mask = padding_mask(2, 24, [24, 13])
    eye = torch.eye(24, dtype=torch.float64)
    out = linformer_attention(q, k, v, eye, eye, key_padding_mask=mask, scaling=0.3)
    ref = dense_attention(q, k, v, key_padding_mask=mask, scaling=0.3, dropout=0.0, causal=False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("h_kv", [4, 2, 1])
@pytest.mark.parametrize("lengths", [[20, 20], [20, 7]])
def test_matches_formula_random_projections_gqa_padding(h_kv, lengths):
    q, k, v = qkv(h_kv=h_kv, n=20)
    g = torch.Generator().manual_seed(3)
    e, f = random_projection(6, 32, generator=g).double(), random_projection(6, 32, generator=g).double()
    mask = padding_mask(2, 20, lengths)
    out = linformer_attention(q, k, v, e, f, key_padding_mask=mask, scaling=0.25)
    torch.testing.assert_close(out, reference(q, k, v, e, f, mask, 0.25), rtol=1e-10, atol=1e-10)


def test_short_input_uses_first_columns_and_masks_empty_segments():
    # n_max 64 in 16 segments of 4; an input of 22 tokens leaves 10 segments empty.
    q, k, v = qkv(n=22)
    e = segment_mean_projection(16, 64).double()
    out = linformer_attention(q, k, v, e, e, key_padding_mask=None, scaling=0.35)
    full = padding_mask(2, 22, [22, 22])
    torch.testing.assert_close(out, reference(q, k, v, e, e, full, 0.35), rtol=1e-10, atol=1e-10)
    assert torch.isfinite(out).all()


def test_padding_is_invisible_to_real_tokens():
    # Same tokens with and without trailing padding (and garbage in the padded slots).
    q, k, v = qkv(b=1, n=30)
    e = segment_mean_projection(8, 40).double()
    real = 19
    mask = padding_mask(1, 30, [real])
    k2, v2 = k.clone(), v.clone()
    k2[:, :, real:] = 1e3
    v2[:, :, real:] = -1e3
    padded = linformer_attention(q, k2, v2, e, e, key_padding_mask=mask, scaling=0.3)[:, :, :real]
    alone = linformer_attention(
        q[:, :, :real], k[:, :, :real], v[:, :, :real], e, e, key_padding_mask=None, scaling=0.3
    )
    torch.testing.assert_close(padded, alone, rtol=1e-10, atol=1e-10)


def test_segment_mean_keeps_the_first_token_and_averages_equal_segments():
    e = segment_mean_projection(4, 10)
    torch.testing.assert_close(e.sum(1), torch.ones(4))
    assert [int((row > 0).sum()) for row in e] == [1, 3, 3, 3]
    assert e[0, 0] == 1 and (e.sum(0) > 0).all()  # every position lands in exactly one slot
    torch.testing.assert_close(segment_mean_projection(1, 5), torch.full((1, 5), 0.2))


def test_too_long_input_raises():
    q, k, v = qkv(n=24)
    e = random_projection(4, 16)
    with pytest.raises(ValueError, match="exceeds the Linformer max_length 16"):
        linformer_attention(q, k, v, e.double(), e.double(), key_padding_mask=None, scaling=1.0)


def test_cost_is_linear_in_n():
    small, big = linformer_cost(1024, 12, 64, 256), linformer_cost(4096, 12, 64, 256)
    assert big["flops"] == 4 * small["flops"]
    assert big["score_bytes"] == 4 * 12 * 4096 * 256


def test_gradients_reach_the_projections():
    q, k, v = qkv(n=20)
    mask = padding_mask(2, 20, [20, 9])
    g = torch.Generator().manual_seed(4)
    e0, f0 = random_projection(5, 24, generator=g).double(), random_projection(5, 24, generator=g).double()
    grads = []
    for fn in (lambda e, f: linformer_attention(q, k, v, e, f, key_padding_mask=mask, scaling=0.3),
               lambda e, f: reference(q, k, v, e, f, mask, 0.3)):  # fmt: skip
        e, f = e0.clone().requires_grad_(True), f0.clone().requires_grad_(True)
        fn(e, f).square().sum().backward()
        grads.append((e.grad, f.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert grads[0][0][:, 20:].abs().max() == 0  # columns past the input get no gradient
