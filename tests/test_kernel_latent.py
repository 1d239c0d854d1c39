"""Latent (Perceiver-style) kernel against float64 references with explicit masks."""

from __future__ import annotations

import pytest
import torch
from conftest import random_qkv

from surgeon.attention.interface import dense_attention
from surgeon.attention.kernels.latent import latent_attention, latent_cost


def qkv(b=2, h=4, h_kv=4, n=24, d=8, seed=0):
    return random_qkv(b, h, h_kv, n, d, seed)


def reference(q, k, v, z, mask, scale, summary_keys="attended"):
    """A = softmax(Z Kᵀ s) over real keys; slots (A K or Z, A V); tokens attend to the slots."""
    read = (z[None] @ k.transpose(-1, -2)) * scale  # (B, H_kv, m, n)
    if mask is not None:
        read = read.masked_fill(~mask[:, None, None, :], float("-inf"))
    a = read.softmax(-1)
    sv = a @ v  # (B, H_kv, m, D)
    sk = a @ k if summary_keys == "attended" else z[None].expand_as(sv)
    groups = q.shape[1] // k.shape[1]
    sk, sv = sk.repeat_interleave(groups, 1), sv.repeat_interleave(groups, 1)
    return ((q @ sk.transpose(-1, -2)) * scale).softmax(-1) @ sv


@pytest.mark.parametrize("summary_keys", ["attended", "latent"])
@pytest.mark.parametrize("h_kv", [4, 2])
@pytest.mark.parametrize("m", [3, 24, 40])  # fewer, as many, more slots than tokens
def test_matches_formula_with_padding_and_gqa(h_kv, m, summary_keys):
    q, k, v = qkv(h_kv=h_kv)
    z = torch.randn(h_kv, m, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 11:] = False
    out = latent_attention(q, k, v, z, key_padding_mask=mask, scaling=0.3, summary_keys=summary_keys)
    torch.testing.assert_close(out, reference(q, k, v, z, mask, 0.3, summary_keys), rtol=1e-10, atol=1e-10)


def test_default_slot_keys_are_the_latents():
    q, k, v = qkv(h_kv=2)
    z = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = latent_attention(q, k, v, z, key_padding_mask=None, scaling=0.3)
    torch.testing.assert_close(out, reference(q, k, v, z, None, 0.3, "latent"), rtol=1e-10, atol=1e-10)


def test_latent_summary_keys_matches_formula():
    # summary_keys="latent": slot keys are the latents, slot values the latent-weighted values.
    q, k, v = qkv(h_kv=2)
    z = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, 9:] = False
    out = latent_attention(q, k, v, z, key_padding_mask=mask, scaling=0.3, summary_keys="latent")
    read = ((z[None] @ k.transpose(-1, -2)) * 0.3).masked_fill(~mask[:, None, None, :], float("-inf"))
    sum_v = (read.softmax(-1) @ v).repeat_interleave(2, 1)  # (B, H, m, D)
    keys = z[None].repeat_interleave(2, 1)  # (1, H, m, D)
    ref = ((q @ keys.transpose(-1, -2)) * 0.3).softmax(-1) @ sum_v
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="summary_keys"):
        latent_attention(q, k, v, z, key_padding_mask=None, scaling=0.3, summary_keys="values")


def test_one_latent_per_token_recovers_dense_attention():
    # Orthogonal keys and latents pointing at them, sharply: each slot reads exactly one token,
    # so slot keys/values are the tokens' own and the second step is dense attention.
    n, d = 6, 8
    q, _, v = qkv(b=1, h=2, h_kv=2, n=n, d=d)
    k = torch.zeros(1, 2, n, d, dtype=torch.float64)
    k[0, :, torch.arange(n), torch.arange(n)] = 1.0
    z = 200.0 * k[0]  # (H_kv, m = n, D)
    out = latent_attention(q, k, v, z, key_padding_mask=None, scaling=1.0, summary_keys="attended")
    ref = dense_attention(q, k, v, key_padding_mask=None, scaling=1.0, dropout=0.0, causal=False)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8)


def test_padding_is_invisible_to_real_tokens():
    q, k, v = qkv(b=1, n=30)
    z = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    real = 17
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask[0, :real] = True
    k2, v2 = k.clone(), v.clone()
    k2[:, :, real:], v2[:, :, real:] = 50.0, -50.0
    padded = latent_attention(q, k2, v2, z, key_padding_mask=mask, scaling=0.3)[:, :, :real]
    short = (t[:, :, :real] for t in (q, k, v))
    alone = latent_attention(*short, z, key_padding_mask=None, scaling=0.3)
    torch.testing.assert_close(padded, alone, rtol=1e-10, atol=1e-10)


def test_latent_shape_must_fit():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="do not fit"):
        z = torch.zeros(3, 4, 8, dtype=torch.float64)  # 3 heads, the keys have 4
        latent_attention(q, k, v, z, key_padding_mask=None, scaling=1.0)


def test_cost_is_linear_in_n():
    assert latent_cost(8192, 12, 64, 256)["flops"] == 2 * latent_cost(4096, 12, 64, 256)["flops"]
    # the default reads the tokens once (Z·Kᵀ, A·V) before they attend the slots: 2 of the
    # 3 passes "attended" makes (it reads them a second time for A·K)
    assert 3 * latent_cost(4096, 12, 64, 256)["flops"] == 2 * latent_cost(4096, 12, 64, 256, "attended")["flops"]


@pytest.mark.parametrize("summary_keys", ["attended", "latent"])
def test_gradients_reach_the_latents(summary_keys):
    q, k, v = qkv()
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, 15:] = False
    z0 = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for fn in (lambda z: latent_attention(q, k, v, z, key_padding_mask=mask, scaling=0.3, summary_keys=summary_keys),
               lambda z: reference(q, k, v, z, mask, 0.3, summary_keys)):  # fmt: skip
        z = z0.clone().requires_grad_(True)
        fn(z).square().sum().backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-9)
