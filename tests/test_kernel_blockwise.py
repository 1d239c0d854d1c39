"""Blockwise kernel (BlockBERT, Qiu et al. 2020) vs a float64 dense reference whose mask is
written from the definition: query block i of head group g sees key block π_g(i)."""

import pytest
import torch

from surgeon.attention.kernels.blockwise import blockwise_attention
from surgeon.errors import SurgeonError


def reference(q, k, v, block_size, perms, causal, pad, scale):
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    k = k.repeat_interleave(h // k.shape[1], dim=1).double()
    v = v.repeat_interleave(h // v.shape[1], dim=1).double()
    q_pos = torch.arange(n_k - n_q, n_k)
    k_pos = torch.arange(n_k)
    out = torch.zeros(b, h, n_q, d, dtype=torch.float64)
    group = h // len(perms)
    for bi in range(b):
        for hi in range(h):
            perm = perms[hi // group]
            allowed = torch.tensor([[perm[p // block_size] == kk // block_size for kk in k_pos.tolist()]
                                    for p in q_pos.tolist()])
            if causal:
                allowed &= k_pos[None, :] <= q_pos[:, None]
            if pad is not None:
                allowed &= pad[bi][None, :]
            s = q[bi, hi].double() @ k[bi, hi].T * scale
            p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
            out[bi, hi] = p @ v[bi, hi]
    return out


def case(n=24, block_size=6, perms=1, causal=False, pad=None, h=4, h_kv=4, n_q=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    n_q = n_q or n
    q = torch.randn(2, h, n_q, 8, generator=g, dtype=dtype)
    k = torch.randn(2, h_kv, n, 8, generator=g, dtype=dtype)
    v = torch.randn(2, h_kv, n, 8, generator=g, dtype=dtype)
    out = blockwise_attention(q, k, v, block_size=block_size, causal=causal, permutations=perms,
                              key_padding_mask=pad, scaling=0.4)
    m = -(-n // block_size)
    perm_lists = ([[(i + s) % m for i in range(m)] for s in range(perms)]
                  if isinstance(perms, int) else perms)
    ref = reference(q, k, v, block_size, perm_lists, causal, pad, 0.4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("perms", [1, 2, 4, [[1, 0, 3, 2], [2, 3, 0, 1]]])
def test_permutations(perms):
    case(perms=perms)


@pytest.mark.parametrize("n", [23, 25, 7])  # not a multiple of the block size: padded, no crash
@pytest.mark.parametrize("causal", [False, True])
def test_padding_to_block_multiple(n, causal):
    case(n=n, block_size=6, perms=1 if causal else 2, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_key_padding(causal, side):
    pad = torch.ones(2, 26, dtype=torch.bool)
    if side == "left":
        pad[0, :9] = False
    else:
        pad[0, 17:] = False
    pad[1, :1] = False
    case(n=26, block_size=6, perms=1 if causal else 4, causal=causal, pad=pad)


def test_gqa_and_float32():
    case(h=8, h_kv=2, perms=2, dtype=torch.float32)


@pytest.mark.parametrize("n_q", [1, 5])
def test_decode_causal(n_q):
    pad = torch.ones(2, 22, dtype=torch.bool)
    pad[1, :3] = False
    case(n=22, n_q=n_q, causal=True, pad=pad)


def test_one_block_equals_dense():
    q = torch.randn(1, 2, 16, 8, dtype=torch.float64)
    for causal in (False, True):
        out = blockwise_attention(q, q, q, block_size=16, causal=causal)
        ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=causal)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_gradients_match_reference():
    q = torch.randn(1, 4, 14, 8, dtype=torch.float64, requires_grad=True)
    pad = torch.ones(1, 14, dtype=torch.bool)
    pad[0, -3:] = False
    out = blockwise_attention(q, q, q, block_size=4, causal=False, permutations=2, key_padding_mask=pad)
    ref = reference(q, q, q, 4, [[0, 1, 2, 3], [1, 2, 3, 0]], False, pad, 8**-0.5)
    (g,) = torch.autograd.grad(out.square().sum(), q)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), q)
    torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=0)


def test_no_n_by_n_allocation():
    from torch.profiler import ProfilerActivity, profile

    n = 4096
    q = torch.randn(1, 2, n, 16)
    pad = torch.ones(1, n, dtype=torch.bool)
    pad[0, -100:] = False
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        blockwise_attention(q, q, q, block_size=256, causal=False, permutations=2, key_padding_mask=pad)
    assert max(e.cpu_memory_usage for e in prof.events()) < n * n * 4 / 8


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(block_size=0, causal=False), "block_size"),
        (dict(block_size=4, causal=True, permutations=2), "identity"),
        (dict(block_size=4, causal=False, permutations=3), "divide"),
        (dict(block_size=4, causal=False, permutations=[[0, 1, 2]]), "permutation"),
        (dict(block_size=4, causal=False, permutations=0), "permutations"),
    ],
)
def test_bad_input(kwargs, msg):
    q = torch.randn(1, 4, 16, 8)
    with pytest.raises(SurgeonError, match=msg):
        blockwise_attention(q, q, q, **kwargs)
