"""The flex route (FlexAttention block-mask predicates, kernels/flex.py) against the same float64
references as the sdpa routes: sliding window (dilation, global tokens, padding, causal, decode),
blockwise (permutations) and the short-range band beside Linformer's / the latent slots.

On the CPU torch 2.13's flex_attention is inference only and its compiled kernel takes no float64,
so the float64 cases run FlexAttention's eager implementation (same predicate and block mask, exact)
and one float32 case per pattern runs the compiled CPU kernel (~20 s of compiling each; the
sliding one in the default run, the others `slow`). Gradients are FlexAttention's CUDA backward:
those tests run only where CUDA is present and skip cleanly elsewhere.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import padding_mask, random_qkv, tiny_inputs, tiny_model
from test_kernel_blockwise import reference as blockwise_reference
from test_kernel_short_range import joint_softmax, linformer_slots, latent_slots
from test_kernel_sliding import dense_reference, reference_mask, run_case

import surgeon
from surgeon.actions.kernel_choice import Kernel
from surgeon.attention.kernels import route
from surgeon.attention.kernels.blockwise import blockwise_attention
from surgeon.attention.kernels.latent import latent_attention
from surgeon.attention.kernels.linformer import linformer_attention, random_projection
from surgeon.attention.kernels.sliding import sliding_window_attention
from surgeon.errors import RecipeError, SurgeonError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flex backward is CUDA-only)")
EXACT = dict(atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "case",
    [
        dict(window=1),
        dict(window=6, block_size=3),
        dict(window=33),
        dict(window=5, causal=True),
        dict(window=6, dilation=[1, 3, 2, 4], n_q=41, n_k=41),
        dict(window=4, causal=True, dilation=2, glob_pos=[0, 17]),
        dict(window=4, dilation=[1, 2], glob_pos=[0, 17]),
        dict(h=8, h_kv=2, window=5, causal=True, dilation=[1, 2], glob_pos=[5]),  # GQA, keys unexpanded
        dict(n_q=9, n_k=30, window=7, causal=True, dilation=[1, 2], glob_pos=[4]),  # decode: last 9 queries
        dict(n_q=74, n_k=74, window=200),  # the window covers the sequence: dense
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_sliding_matches_reference(case):
    out, ref = run_case(method="flex", **case)
    torch.testing.assert_close(out, ref, **EXACT)


@pytest.mark.parametrize("causal", [False, True])
def test_sliding_padding_globals_and_empty_rows(causal):
    n = 40
    pad = padding_mask(2, n, [27, 40])
    pad[1, :5] = False  # left padding in row 1; global 0 is then padding there
    out, ref = run_case(
        method="flex", n_q=n, n_k=n, window=6, causal=causal, pad=pad, glob_pos=[0, 14], dilation=[2, 1]
    )
    torch.testing.assert_close(out, ref, **EXACT)
    nothing = torch.zeros(2, n, dtype=torch.bool)  # every key padded: every row outputs 0
    q = torch.randn(2, 2, n, 8, dtype=torch.float64)
    zero = sliding_window_attention(
        q, q.clone(), q.clone(), window=6, causal=causal, key_padding_mask=nothing, method="flex"
    )
    assert torch.equal(zero, torch.zeros_like(zero))


@pytest.mark.parametrize(  # n = 23: the last block is short
    "perms, causal, n",
    [
        (1, False, 23),
        (1, True, 23),
        (2, False, 24),
        (2, False, 23),
        ([[1, 0, 3, 2], [2, 3, 0, 1]], False, 24),
    ],
)
def test_blockwise_matches_reference(perms, causal, n):
    q, k, v = random_qkv(h=4, h_kv=2, n=n)
    pad = padding_mask(2, n, [n, n - 5])
    out = blockwise_attention(
        q,
        k,
        v,
        block_size=6,
        causal=causal,
        permutations=perms,
        key_padding_mask=pad,
        scaling=0.4,
        method="flex",
    )
    m = -(-n // 6)
    perm_lists = [[(i + s) % m for i in range(m)] for s in range(perms)] if isinstance(perms, int) else perms
    torch.testing.assert_close(out, blockwise_reference(q, k, v, 6, perm_lists, causal, pad, 0.4), **EXACT)


def test_blockwise_decode_step():
    q, k, v = random_qkv(n=30)
    out = blockwise_attention(q[:, :, -3:], k, v, block_size=8, causal=True, method="flex", scaling=0.3)
    ref = blockwise_reference(q[:, :, -3:], k, v, 8, [list(range(4))], True, None, 0.3)
    torch.testing.assert_close(out, ref, **EXACT)


@pytest.mark.parametrize(
    "lengths, window", [([20, 20], 2), ([20, 7], 6), ([20, 7], 64)]
)  # 64: the band covers all
def test_linformer_band_matches_the_joint_softmax(lengths, window):
    q, k, v = random_qkv(h_kv=2, n=20)
    g = torch.Generator().manual_seed(1)
    e, f = random_projection(6, 32, generator=g).double(), random_projection(6, 32, generator=g).double()
    mask = padding_mask(2, 20, lengths)
    out = linformer_attention(
        q, k, v, e, f, key_padding_mask=mask, scaling=0.3, local_window=window, method="flex"
    )
    pk, pv, live = linformer_slots(k, v, e, f, mask, 2)
    ref = joint_softmax(q, k, v, pk, pv, live, mask, window, 0.3)
    real = mask[:, None, :, None]  # rows of padded queries are not compared
    torch.testing.assert_close(out * real, ref * real, **EXACT)


def test_latent_band_matches_the_joint_softmax():
    q, k, v = random_qkv(h_kv=2, n=24)
    z = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = padding_mask(2, 24, [24, 9])
    out = latent_attention(q, k, v, z, key_padding_mask=mask, scaling=0.3, local_window=8, method="flex")
    sum_k, sum_v = latent_slots(k, v, z, mask, 0.3, 2, "latent")
    ref = joint_softmax(q, k, v, sum_k, sum_v, None, mask, 8, 0.3)
    real = mask[:, None, :, None]
    torch.testing.assert_close(out * real, ref * real, **EXACT)


def test_compiled_cpu_float32_sliding():
    """The compiled CPU kernel itself (float32): dilation groups, global tokens, padding."""
    n = 160  # two 128-query tiles, one of them partial
    pad = padding_mask(2, n, [n, 131])
    with torch.no_grad():
        out, ref = run_case(
            method="flex",
            dtype=torch.float32,
            n_q=n,
            n_k=n,
            window=16,
            dilation=[1, 2],
            glob_pos=[0, 70],
            pad=pad,
        )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_cpu_float32_blockwise_and_band():
    q, k, v = random_qkv(h=4, h_kv=2, n=150, d=16)
    pad = padding_mask(2, 150, [150, 99])
    with torch.no_grad():
        out = blockwise_attention(
            q.float(),
            k.float(),
            v.float(),
            block_size=32,
            causal=False,
            permutations=2,
            key_padding_mask=pad,
            scaling=0.25,
            method="flex",
        )
        m = -(-150 // 32)
        ref = blockwise_reference(
            q, k, v, 32, [[(i + s) % m for i in range(m)] for s in range(2)], False, pad, 0.25
        )
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
        z = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        out = latent_attention(
            q.float(),
            k.float(),
            v.float(),
            z.float(),
            key_padding_mask=pad,
            scaling=0.25,
            local_window=32,
            method="flex",
        )
    sum_k, sum_v = latent_slots(k, v, z, pad, 0.25, 2, "latent")
    ref = joint_softmax(q, k, v, sum_k, sum_v, None, pad, 32, 0.25)
    real = pad[:, None, :, None]
    torch.testing.assert_close(out.double() * real, ref * real, atol=1e-5, rtol=0)


def test_refusals_are_one_line():
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    with pytest.raises(SurgeonError, match="no backward on CPU.*kernel: sdpa"):
        sliding_window_attention(q, q, q, window=4, causal=False, method="flex")
    with pytest.raises(SurgeonError, match="no backward on CPU"):
        blockwise_attention(q, q, q, block_size=4, causal=False, method="flex")
    with torch.no_grad(), pytest.raises(SurgeonError, match="no attention dropout"):
        sliding_window_attention(q, q, q, window=4, causal=False, dropout=0.1, method="flex")
    with pytest.raises(SurgeonError, match="kernel method must be one of"):
        blockwise_attention(q, q, q, block_size=4, causal=False, method="triton")


def test_auto_takes_flex_on_cuda_only():
    shape = dict(batch=1, heads=12, head_dim=64, n_q=4096, n_k=4096, lo=-128, hi=128)
    assert route.choose_route("auto", **shape) == route.BLOCKED  # CPU: today's cost model
    assert route.choose_route("auto", **shape, device_type="cuda") == route.FLEX
    assert route.choose_route("sdpa", **shape, device_type="cuda") == route.BLOCKED
    assert (
        route.choose_route("auto", **shape, device_type="cuda", dropout=0.1) == route.BLOCKED
    )  # flex has none
    assert route.choose_route("auto", **shape, device_type="cuda", dtype=torch.float64) == route.BLOCKED
    assert route.choose_route("flex", **shape) == route.FLEX
    decode = dict(shape, n_q=1)  # one query: less than a flex tile
    assert (
        route.choose_kernel("auto", device_type="cuda", dtype=torch.bfloat16, n_q=decode["n_q"]) == route.SDPA
    )
    assert set(Kernel.__args__) == set(route.KERNELS)


def test_recipe_kernel_param_reaches_the_kernel(tmp_path):
    """kernel: flex on a (float64) BERT gives the sdpa route's outputs; bad values are refused."""
    base = tiny_model("bert").double()
    inputs = tiny_inputs("bert", seq=40)
    inputs["attention_mask"][1, 31:] = 0
    outs = {}
    for kernel in ("sdpa", "flex"):
        rules = [
            {
                "do": "sliding_window",
                "select": {"role": "attn"},
                "with": {"window": 8, "dilation": [1, 2], "global_tokens": [0], "kernel": kernel},
            }
        ]
        model = copy.deepcopy(base)
        surgeon.patch(model, {"surgeon": 1, "rules": rules})
        with torch.no_grad():
            outs[kernel] = model(**inputs).last_hidden_state
    real = inputs["attention_mask"].bool()[..., None]
    torch.testing.assert_close(outs["flex"] * real, outs["sdpa"] * real, **EXACT)
    bad = [{"do": "blockwise", "select": {"role": "attn"}, "with": {"block_size": 8, "kernel": "triton"}}]
    with pytest.raises((RecipeError, SurgeonError), match="kernel"):
        surgeon.patch(tiny_model("bert"), {"surgeon": 1, "rules": bad})
    no_band = [{"do": "latent", "select": {"role": "attn"}, "with": {"m": 4, "kernel": "flex"}}]
    with pytest.raises((RecipeError, SurgeonError), match="local_window"):
        surgeon.patch(tiny_model("bert"), {"surgeon": 1, "rules": no_band})


# -- CUDA: the compiled GPU kernels, forward and backward --------------------------------------


def _grads(out, tensors, weight):
    return torch.autograd.grad((out * weight).sum(), tensors)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "causal, dilation, glob_pos", [(False, 1, None), (True, [1, 2], [0, 70]), (False, [1, 2], [0])]
)
def test_cuda_sliding_forward_and_gradients(dtype, causal, dilation, glob_pos):
    n, h, d = 200, 4, 16
    g = torch.Generator().manual_seed(3)
    cpu = [torch.randn(2, h, n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    dev = [t.detach().to("cuda", dtype).requires_grad_(True) for t in cpu]
    pad = padding_mask(2, n, [n, 170])
    glob = None
    if glob_pos is not None:
        glob = torch.zeros(2, n, dtype=torch.bool)
        glob[:, glob_pos] = True
    kw = dict(window=16, causal=causal, dilation=dilation)
    out = sliding_window_attention(
        *dev,
        **kw,
        key_padding_mask=pad.cuda(),
        global_mask=None if glob is None else glob.cuda(),
        method="flex",
    )
    dils = [dilation] if isinstance(dilation, int) else dilation
    masks = [
        reference_mask(n, n, 16, causal, dils, None if glob is None else glob[bi], pad[bi]) for bi in range(2)
    ]
    ref = dense_reference(*cpu, masks, d**-0.5)
    tol = dict(atol=2e-2, rtol=0) if dtype == torch.bfloat16 else dict(atol=2e-4, rtol=0)
    torch.testing.assert_close(out.double().cpu(), ref, **tol)
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for name, got, want in zip("qkv", _grads(out, dev, weight.to("cuda", dtype)), _grads(ref, cpu, weight)):
        torch.testing.assert_close(got.double().cpu(), want, **tol, msg=f"d{name}")


@cuda
def test_cuda_blockwise_and_band_gradients():
    q, k, v = random_qkv(h=4, h_kv=2, n=150, d=16)
    cpu = [t.clone().requires_grad_(True) for t in (q, k, v)]
    dev = [t.detach().float().cuda().requires_grad_(True) for t in (q, k, v)]
    pad = padding_mask(2, 150, [150, 99])
    m = -(-150 // 32)
    out = blockwise_attention(
        *dev,
        block_size=32,
        causal=False,
        permutations=2,
        key_padding_mask=pad.cuda(),
        scaling=0.25,
        method="flex",
    )
    ref = blockwise_reference(*cpu, 32, [[(i + s) % m for i in range(m)] for s in range(2)], False, pad, 0.25)
    weight = torch.randn(out.shape, dtype=torch.float64)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-4, rtol=0)
    for got, want in zip(_grads(out, dev, weight.float().cuda()), _grads(ref, cpu, weight)):
        torch.testing.assert_close(got.double().cpu(), want, atol=2e-4, rtol=0)
    z = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = latent_attention(
        *dev, z.float().cuda(), key_padding_mask=pad.cuda(), scaling=0.25, local_window=32, method="flex"
    )
    sum_k, sum_v = latent_slots(*cpu[1:], z, pad, 0.25, 2, "latent")
    ref = joint_softmax(*cpu, sum_k, sum_v, None, pad, 32, 0.25)
    real = pad[:, None, :, None]
    torch.testing.assert_close(out.double().cpu() * real, ref * real, atol=2e-4, rtol=0)
    for got, want in zip(
        _grads(out * real.cuda(), dev, weight.float().cuda()), _grads(ref * real, cpu, weight)
    ):
        torch.testing.assert_close(got.double().cpu(), want, atol=2e-4, rtol=0)
