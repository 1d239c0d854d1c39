"""Sliding-window kernel vs a float64 dense reference built from an explicit (n_q, n_k) mask.

The reference mask is written from the definition (Longformer, Beltagy et al. 2020), not from
the kernel's block decomposition, so the two can disagree."""

import pytest
import torch

from surgeon.attention.kernels.route import masked_is_cheaper
from surgeon.attention.kernels.sliding import sliding_window_attention
from surgeon.errors import SurgeonError

# Both routes compute the same function: the band plan's blocked calls, and the one masked call
# that short inputs take (sliding_masked.py; route.py chooses). Tiny test sizes would always take the masked one
# under method="auto", so each reference test runs both explicitly.


@pytest.fixture(params=["blocked", "masked"])
def method(request):
    return request.param


def reference_mask(n_q, n_k, window, causal, dilation, glob=None, pad=None):
    """(H_groups, n_q, n_k) bool per dilation group, for one batch element."""
    q_pos = torch.arange(n_k - n_q, n_k)[:, None]
    k_pos = torch.arange(n_k)[None, :]
    rel = q_pos - k_pos
    masks = []
    for dil in dilation:
        steps = torch.div(rel, dil, rounding_mode="floor")
        on_grid = rel % dil == 0
        if causal:
            m = on_grid & (steps >= 0) & (steps <= window - 1)
        else:
            m = on_grid & (steps.abs() <= window // 2)
        if glob is not None:
            g = glob & pad if pad is not None else glob
            vis = k_pos <= q_pos if causal else torch.ones_like(m)
            m = m | (g[None, :] & vis) | (g[n_k - n_q :, None] & vis)
        if pad is not None:
            m = m & pad[None, :]
        masks.append(m)
    return torch.stack(masks)


def dense_reference(q, k, v, masks_per_batch, scale):
    """float64 masked softmax; rows with no allowed key give zeros."""
    b, h, n_q, d = q.shape
    groups = h // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).double()
    v = v.repeat_interleave(groups, dim=1).double()
    out = torch.zeros(b, h, n_q, d, dtype=torch.float64)
    for bi in range(b):
        m = masks_per_batch[bi]  # (G, n_q, n_k)
        m = m.repeat_interleave(h // m.shape[0], dim=0)  # (H, n_q, n_k)
        s = q[bi].double() @ k[bi].transpose(-1, -2) * scale
        s = s.masked_fill(~m, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        out[bi] = p @ v[bi]
    return out


def run_case(b=2, h=4, h_kv=4, n_q=37, n_k=37, d=8, window=6, causal=False, dilation=1,
             glob_pos=None, glob_mask=None, pad=None, block_size=None, dtype=torch.float64, seed=0,
             method="blocked"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g, dtype=dtype)
    k = torch.randn(b, h_kv, n_k, d, generator=g, dtype=dtype)
    v = torch.randn(b, h_kv, n_k, d, generator=g, dtype=dtype)
    glob = glob_mask
    if glob_pos is not None:
        glob = torch.zeros(b, n_k, dtype=torch.bool)
        glob[:, glob_pos] = True
    dils = [dilation] if isinstance(dilation, int) else dilation
    scale = 0.3
    out = sliding_window_attention(
        q, k, v, window=window, causal=causal, dilation=dilation, global_mask=glob,
        key_padding_mask=pad, scaling=scale, block_size=block_size, method=method,
    )
    masks = [
        reference_mask(n_q, n_k, window, causal, dils,
                       glob[bi] if glob is not None else None, pad[bi] if pad is not None else None)
        for bi in range(b)
    ]
    ref = dense_reference(q, k, v, masks, scale)
    assert out.shape == (b, h, n_q, d)
    assert torch.isfinite(out).all()
    return out.double(), ref


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 2, 5, 8, 16, 33])
@pytest.mark.parametrize("block_size", [None, 3, 8])
def test_window_matches_reference(causal, window, block_size, method):
    out, ref = run_case(method=method, window=window, causal=causal, block_size=block_size)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_window_covering_sequence_equals_dense(causal, method):
    n = 29
    out, ref = run_case(method=method, n_q=n, n_k=n, window=2 * n + 2, causal=causal)
    dense_masks = [reference_mask(n, n, 10**6, causal, [1])] * 2
    assert all(bool(m.all()) for m in dense_masks) or causal
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    q = torch.randn(1, 2, n, 8, dtype=torch.float64)
    full = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=causal)
    ours = sliding_window_attention(q, q, q, window=2 * n, causal=causal, method=method)
    torch.testing.assert_close(ours, full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dilation", [2, 3, [1, 2], [1, 3, 2, 4]])
def test_dilation_per_head_group(causal, dilation, method):
    out, ref = run_case(method=method, window=6, causal=causal, dilation=dilation, n_q=41, n_k=41, block_size=4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_global_positions_and_mask(causal, method):
    out, ref = run_case(method=method, window=4, causal=causal, glob_pos=[0, 17], block_size=4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    gm = torch.zeros(2, 37, dtype=torch.bool)
    gm[0, [3, 30]] = True  # batch elements with different global tokens; batch 1 has none
    out, ref = run_case(method=method, window=4, causal=causal, glob_mask=gm, dilation=[1, 2], block_size=5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(causal, side, method):
    n = 40
    pad = torch.ones(2, n, dtype=torch.bool)
    if side == "left":
        pad[0, :13] = False
        pad[1, :2] = False
    else:
        pad[0, 27:] = False
        pad[1, 38:] = False
    out, ref = run_case(method=method, n_q=n, n_k=n, window=6, causal=causal, pad=pad, glob_pos=[0, 14], block_size=4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    out, ref = run_case(method=method, n_q=n, n_k=n, window=7, causal=causal, pad=pad, dilation=[2, 1], block_size=8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_gqa(causal, method):
    out, ref = run_case(method=method, h=8, h_kv=2, window=5, causal=causal, dilation=[1, 2], glob_pos=[5])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_q", [1, 3, 9])
@pytest.mark.parametrize("dilation", [1, 2])
def test_decode_queries_are_last_positions(n_q, dilation, method):
    pad = torch.ones(2, 30, dtype=torch.bool)
    pad[1, :4] = False
    out, ref = run_case(method=method, n_q=n_q, n_k=30, window=7, causal=True, dilation=dilation, pad=pad,
                        glob_pos=[4], block_size=4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_k", [5, 7, 30], ids=["keys-inside-window", "keys-equal-window", "keys-past-window"])
@pytest.mark.parametrize("h_kv", [4, 2])
@pytest.mark.parametrize("padded", ["none", "some", "window-all-padded"])
def test_decode_step_fast_path(n_k, h_kv, padded):
    # method "auto", one causal query, no dilation or global token: one SDPA call over the last
    # `window` keys (sliding._decode_step), GQA in the kernel; a query with no key left gives zeros
    pad = None
    if padded != "none":
        pad = torch.ones(2, n_k, dtype=torch.bool)
        pad[1, : n_k // 2] = False
        if padded == "window-all-padded":
            pad[0, :] = False
    out, ref = run_case(method="auto", n_q=1, n_k=n_k, window=7, causal=True, h_kv=h_kv, pad=pad)
    torch.testing.assert_close(out, ref, atol=1e-8, rtol=0)
    if padded == "window-all-padded":
        assert out[0].abs().max() == 0


@pytest.mark.parametrize("pad_side", [None, "left", "right"])
@pytest.mark.parametrize("glob_pos", [None, [0, 7]])
def test_causal_prefix_fast_path(pad_side, glob_pos):
    # window 16 ≥ block 4: the first 16 queries take the fused is_causal call (unless padding
    # reaches into them), the rest the band; values, global merge and gradients must not tell
    n = 50
    pad = None
    if pad_side:
        pad = torch.ones(2, n, dtype=torch.bool)
        if pad_side == "left":
            pad[1, :5] = False
        else:
            pad[1, -5:] = False
    out, ref = run_case(n_q=n, n_k=n, window=16, causal=True, block_size=4, glob_pos=glob_pos, pad=pad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    q = torch.randn(1, 2, n, 4, dtype=torch.float64, requires_grad=True)
    out = sliding_window_attention(q, q, q, window=16, causal=True, block_size=4)
    (g,) = torch.autograd.grad(out.square().sum(), q)
    ref = dense_reference(q, q, q, [reference_mask(n, n, 16, True, [1])], q.shape[-1] ** -0.5)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), q)
    torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=0)


def test_float32_and_grad_with_globals(method):
    out, ref = run_case(method=method, dtype=torch.float32, window=8, glob_pos=[0], dilation=[1, 2])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # gradients through the log-sum-exp merge match the dense masked reference
    q = torch.randn(1, 2, 20, 4, dtype=torch.float64, requires_grad=True)
    glob = torch.zeros(1, 20, dtype=torch.bool)
    glob[0, 0] = True
    out = sliding_window_attention(q, q, q, window=4, causal=False, global_mask=glob, block_size=4,
                                   method=method)
    (g,) = torch.autograd.grad(out.square().sum(), q)
    m = reference_mask(20, 20, 4, False, [1], glob[0])
    ref = dense_reference(q, q, q, [m], q.shape[-1] ** -0.5)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), q)
    torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_no_n_by_n_allocation(causal):
    """At n=4096 no single op may allocate even 1/8 of one head's n×n fp32 scores (8 MiB),
    globals, padding and dilation included."""
    from torch.profiler import ProfilerActivity, profile

    n = 4096
    q = torch.randn(1, 2, n, 16)
    pad = torch.ones(1, n, dtype=torch.bool)
    pad[0, -100:] = False
    glob = torch.zeros(1, n, dtype=torch.bool)
    glob[0, [0, 2000]] = True
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = sliding_window_attention(q, q, q, window=64, causal=causal, dilation=[1, 2],
                                       global_mask=glob, key_padding_mask=pad)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert torch.isfinite(out).all()
    assert biggest < n * n * 4 / 8, f"an op allocated {biggest / 2**20:.1f} MiB"


@pytest.mark.parametrize("dilation", [1, [1, 2]])  # 1: the fused joint backward; [1, 2]: explicit scores per residue
def test_no_n_by_n_allocation_in_a_training_step(dilation):
    from torch.profiler import ProfilerActivity, profile

    n = 4096
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
    pad = torch.ones(1, n, dtype=torch.bool)
    pad[0, -100:] = False
    glob = torch.zeros(1, n, dtype=torch.bool)
    glob[0, [0, 2000]] = True
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = sliding_window_attention(q, k, v, window=64, causal=False, dilation=dilation,
                                       global_mask=glob, key_padding_mask=pad)  # fmt: skip
        out.square().sum().backward()
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert biggest < n * n * 4 / 8, f"an op allocated {biggest / 2**20:.1f} MiB"


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(window=0), "window"),
        (dict(window=4, dilation=0), "dilation"),
        (dict(window=4, dilation=[1, 2, 3]), "head groups"),
        (dict(window=4, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), "key_padding_mask"),
        (dict(window=4, global_mask=torch.ones(1, 10)), "global_mask"),
        (dict(window=4, method="dense"), "method"),
    ],
)
def test_bad_input(kwargs, msg):
    q = torch.randn(1, 4, 10, 8)
    with pytest.raises(SurgeonError, match=msg):
        sliding_window_attention(q, q, q, causal=False, **kwargs)


def test_dropout_path_trains(method):
    """Dropout has no fused path: the explicit-scores path must run, differ from eval, and
    with p→0 agree with it."""
    q = torch.randn(1, 2, 40, 8, requires_grad=True)
    glob = torch.zeros(1, 40, dtype=torch.bool)
    glob[0, 0] = True
    kw = dict(window=8, causal=False, global_mask=glob, block_size=8)
    torch.manual_seed(0)
    dropped = sliding_window_attention(q, q, q, dropout=0.5, method=method, **kw)
    exact = sliding_window_attention(q, q, q, method=method, **kw)
    assert (dropped - exact).abs().max() > 1e-3
    tiny = sliding_window_attention(q, q, q, dropout=1e-12, method=method, **kw)
    torch.testing.assert_close(tiny, exact, atol=1e-5, rtol=0)
    (g,) = torch.autograd.grad(dropped.sum(), q)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("window,causal", [(8, False), (6, False), (5, True), (3, False)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("global_positions", [None, [0], [0, 21, 33]])
def test_gradients_of_query_key_value_match_the_reference(window, causal, padded, global_positions, method):
    # with block_size 4 most blocks are interior: their keys are overlapping strips whose
    # gradient is summed back by overlapping_strips (strip length a multiple of 4 or not);
    # with global tokens the band and the global keys share one softmax whose backward is
    # joint.py's (each part's fused backward with the joint output and log-sum-exp)
    n, h, d = 40, 2, 8
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(2, h, n, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    pad = None
    if padded:  # right padding in row 0, left padding in row 1 (global 0 then is padding there)
        pad = torch.ones(2, n, dtype=torch.bool)
        pad[0, 31:] = False
        pad[1, :7] = False
    glob = None
    if global_positions is not None:
        glob = torch.zeros(2, n, dtype=torch.bool)
        glob[:, global_positions] = True
    out = sliding_window_attention(*tensors, window=window, causal=causal, key_padding_mask=pad, global_mask=glob,
                                   block_size=4, method=method)  # fmt: skip
    masks = [reference_mask(n, n, window, causal, [1], glob=None if glob is None else glob[bi],
                            pad=None if pad is None else pad[bi]) for bi in range(2)]  # fmt: skip
    ref = dense_reference(*tensors, masks, d**-0.5)
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weight).sum(), tensors)
    grads_ref = torch.autograd.grad((ref * weight).sum(), tensors)
    for name, got, want in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"d{name}")


@pytest.mark.parametrize("dilation", [1, [1, 2]])
def test_gradients_with_gqa_globals_and_dilation(dilation, method):
    # 4 query heads share 2 key heads; dilation 1 trains through joint.py, the dilated group
    # through explicit scores per residue: both must match the reference
    n = 40
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    glob = torch.zeros(2, n, dtype=torch.bool)
    glob[:, [0, 13]] = True
    out = sliding_window_attention(q, k, v, window=8, causal=False, global_mask=glob, block_size=4, dilation=dilation,
                                   method=method)
    groups = [dilation] if isinstance(dilation, int) else dilation
    ref = dense_reference(q, k, v, [reference_mask(n, n, 8, False, groups, glob=glob[bi]) for bi in range(2)], 8**-0.5)
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for name, got, want in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"d{name}")


def test_auto_route_takes_the_mask_only_for_short_inputs():
    # a sentence encoder's batch (8 × 256 tokens, 12 heads of 32, ±32 and a global token):
    # the blocked plan's fixed cost per call dominates — measured 1.8× slower than the mask
    assert masked_is_cheaper(8, 12, 32, 256, 256, -32, 32, [1], True, None)
    # long inputs, or a narrow window over a medium one: the band computes far fewer scores
    assert not masked_is_cheaper(1, 12, 64, 4096, 4096, -256, 256, [1], False, None)
    assert not masked_is_cheaper(1, 12, 64, 1024, 1024, -8, 8, [1], False, None)
    assert not masked_is_cheaper(1, 12, 64, 1024, 1024, -64, 64, [1, 2], True, None)
    # never an n×n mask past 2^20 scores per batch element, or 2^23 for the batch, whatever the window
    assert not masked_is_cheaper(1, 12, 64, 2048, 2048, -2000, 2000, [1], False, None)
    assert masked_is_cheaper(8, 12, 32, 1024, 1024, -500, 500, [1], False, None)
    assert not masked_is_cheaper(9, 12, 32, 1024, 1024, -500, 500, [1], False, None)


@pytest.mark.parametrize("n", [40, 1500])
def test_auto_route_equals_both_routes(n):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    glob = torch.zeros(2, n, dtype=torch.bool)
    glob[:, 0] = True
    pad = torch.ones(2, n, dtype=torch.bool)
    pad[1, n - 7 :] = False
    kw = dict(window=16, causal=False, dilation=[1, 2], global_mask=glob, key_padding_mask=pad)
    auto = sliding_window_attention(q, k, v, **kw)
    for method in ("blocked", "masked"):
        torch.testing.assert_close(auto, sliding_window_attention(q, k, v, method=method, **kw), atol=1e-10, rtol=0)
