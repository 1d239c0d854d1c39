"""The short-range band beside Linformer's projections and the latent slots (Long-Short
Transformer) against float64 references that build the joint softmax from explicit scores."""

from __future__ import annotations

import pytest
import torch
from conftest import padding_mask, random_qkv

from surgeon.attention.kernels import short_range
from surgeon.attention.kernels.latent import latent_attention
from surgeon.attention.kernels.linformer import linformer_attention, linformer_cost, random_projection
from surgeon.attention.kernels.route import choose_route

INF = float("-inf")


@pytest.fixture(params=["blocked", "masked"])
def route(request, monkeypatch):
    """Both routes compute the same function: the band's blocked calls merged with the slots,
    and the one masked call that short inputs take; the tests' tiny sizes would always take
    the masked one, so each test runs both."""
    monkeypatch.setattr(short_range, "choose_route", lambda method, **shape: request.param)
    return request.param


def joint_softmax(q, k, v, far_k, far_v, far_live, mask, window, scale):
    """softmax over [keys within ±window/2 | slots], one row per query, in float64."""
    n = k.shape[2]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    pos = torch.arange(n)
    near_ok = ((pos[:, None] - pos[None, :]).abs() <= window // 2)[None, None] & mask[:, None, None, :]
    near = (q @ k.transpose(-1, -2) * scale).masked_fill(~near_ok, INF)  # (B, H, n, n)
    far = q @ far_k.transpose(-1, -2) * scale  # (B, H, n, slots)
    if far_live is not None:
        far = far.masked_fill(~far_live, INF)
    p = torch.cat([near, far], -1).softmax(-1)
    return p[..., :n] @ v + p[..., n:] @ far_v


def linformer_slots(k, v, e, f, mask, groups):
    n = k.shape[2]
    e, f = e[:, :n], f[:, :n]
    keep = mask[:, None, :, None].to(k.dtype)
    pk, pv = e @ (k * keep), f @ (v * keep)  # (B, H_kv, k, D)
    live = ((mask.to(e.dtype) @ (e.abs() + f.abs()).T) > 0)[:, None, None, :]  # (B, 1, 1, k)
    return pk.repeat_interleave(groups, 1), pv.repeat_interleave(groups, 1), live


def latent_slots(k, v, z, mask, scale, groups, summary_keys):
    read = (z[None] @ k.transpose(-1, -2) * scale).masked_fill(~mask[:, None, None, :], INF).softmax(-1)
    sum_k = read @ k if summary_keys == "attended" else z[None].expand(k.shape[0], -1, -1, -1)
    return sum_k.repeat_interleave(groups, 1), (read @ v).repeat_interleave(groups, 1)


@pytest.mark.parametrize("h_kv", [4, 2])
@pytest.mark.parametrize("lengths", [[20, 20], [20, 7]])
@pytest.mark.parametrize("window", [2, 6, 64])
def test_linformer_band_matches_the_joint_softmax(h_kv, lengths, window, route):
    q, k, v = random_qkv(h_kv=h_kv, n=20)
    g = torch.Generator().manual_seed(1)
    e, f = random_projection(6, 32, generator=g).double(), random_projection(6, 32, generator=g).double()
    mask = padding_mask(2, 20, lengths)
    out = linformer_attention(q, k, v, e, f, key_padding_mask=mask, scaling=0.3, local_window=window)
    pk, pv, live = linformer_slots(k, v, e, f, mask, 4 // h_kv)
    ref = joint_softmax(q, k, v, pk, pv, live, mask, window, 0.3)
    real = mask[:, None, :, None]  # rows of padded queries are not compared
    torch.testing.assert_close(out * real, ref * real, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("summary_keys", ["attended", "latent"])
@pytest.mark.parametrize("lengths", [[24, 24], [24, 9]])
def test_latent_band_matches_the_joint_softmax(summary_keys, lengths, route):
    q, k, v = random_qkv(h_kv=2, n=24)
    z = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = padding_mask(2, 24, lengths)
    out = latent_attention(q, k, v, z, key_padding_mask=mask, scaling=0.3, summary_keys=summary_keys, local_window=8)
    sum_k, sum_v = latent_slots(k, v, z, mask, 0.3, 2, summary_keys)
    ref = joint_softmax(q, k, v, sum_k, sum_v, None, mask, 8, 0.3)
    real = mask[:, None, :, None]
    torch.testing.assert_close(out * real, ref * real, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", [40, 130])  # 130: some query blocks of 32 read interior key strips
def test_gradients_match_the_reference(n, route):
    # the band and the slots share one softmax; training runs joint.py's fused backward
    q, k, v = random_qkv(n=n)
    mask = padding_mask(2, n, [n, n - 9])
    e = random_projection(6, n, generator=torch.Generator().manual_seed(4)).double()
    grads = []
    for kernel in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, e)]
        qq, kk, vv, ee = leaves
        if kernel:
            out = linformer_attention(qq, kk, vv, ee, ee, key_padding_mask=mask, scaling=0.3, local_window=10)
        else:
            pk, pv, live = linformer_slots(kk, vv, ee, ee, mask, 1)
            out = joint_softmax(qq, kk, vv, pk, pv, live, mask, 10, 0.3)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        (out * weights * mask[:, None, :, None]).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("summary_keys", ["attended", "latent"])
def test_float32_fused_path_matches_without_grad(summary_keys, route):
    # at inference the band and the slots both go through the fused CPU kernel
    q, k, v = random_qkv(n=200, d=16)
    mask = padding_mask(2, 200, [200, 150])
    z = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        out = latent_attention(q.float(), k.float(), v.float(), z.float(), key_padding_mask=mask, scaling=0.25,
                               local_window=32, summary_keys=summary_keys)  # fmt: skip
    sum_k, sum_v = latent_slots(k, v, z, mask, 0.25, 1, summary_keys)
    ref = joint_softmax(q, k, v, sum_k, sum_v, None, mask, 32, 0.25)
    real = mask[:, None, :, None]
    torch.testing.assert_close((out.double() * real), ref * real, rtol=1e-5, atol=1e-5)


def test_cost_adds_the_band():
    plain = linformer_cost(1024, 12, 64, 64)
    banded = linformer_cost(1024, 12, 64, 64, local_window=16)
    assert banded["flops"] - plain["flops"] == 4 * 12 * 1024 * 17 * 64
    assert linformer_cost(1024, 12, 64, 64, local_window=0) == plain


def test_short_inputs_take_the_masked_route(monkeypatch):
    """with_short_range asks route.py with its slots weighing as a global token."""
    chosen = []

    class Chosen(Exception):
        pass

    def spy(method, **shape):
        chosen.append(choose_route(method, **shape))
        raise Chosen  # the route is all this test needs: skip the attention itself

    monkeypatch.setattr(short_range, "choose_route", spy)
    for b, n, d in [(8, 256, 32), (1, 4096, 64), (1, 1024, 64)]:
        q = torch.zeros(b, 12, n, d)
        far = torch.zeros(b, 12, 64, d)
        with pytest.raises(Chosen):
            short_range.with_short_range(q, q, q, far, far, window=16, far_mask=None, key_padding_mask=None,
                                         scaling=d**-0.5)  # fmt: skip
    assert chosen == ["masked", "blocked", "blocked"]