"""Which route computes a local attention pattern — the one place that decides.

First the kernel family (`choose_kernel`): "flex" — PyTorch's FlexAttention compiling the pattern
from a mask predicate (flex.py; Dong et al. 2024) — or "sdpa", the fused scaled-dot-product
kernels the routes below are built from. "auto" takes flex on CUDA, where FlexAttention's
generated kernels skip the masked-out blocks, and sdpa on the CPU, where torch 2.13's flex has no
backward and (benchmarks/attention.py --flex) its compiled forward does not beat these routes.
Blockwise attention (blockwise.py) asks `choose_kernel` alone; on sdpa it has one route.

Then, on sdpa, two routes compute the same sliding-window function:
- "blocked": the band's plan of fused calls (band.py), one batch element at a time, with the
  global keys and queries as separate small attentions merged by log-sum-exp;
- "masked": the whole pattern as one bool (B, n_q, n_k) mask and one fused call per dilation
  head group over the whole batch (sliding_masked.py).

`sliding_window_attention` (sliding.py) and the short-range band beside Linformer's and the
latent slots (short_range.py) both ask `choose_route`; a new route is a name in `METHODS`, a
branch here and the function the callers dispatch to.

The blocked route pays a fixed cost for every fused call it makes, per batch element; on long
inputs that is noise, on short ones it dominates, while the mask's wasted scores are cheap. The
cost model weighs the two in units of one score's multiply-adds over the head dimension: a
blocked score costs ~1.5 (forward) to ~2 (training) masked ones — the flash kernel's 32-query
tiles against SDPA's 256 — every fused call of the plan ~6.5e6 (≈ 0.2 ms forward, per batch
element), and a global token adds ~70–120 scores per query plus two calls. The constants were
fitted by `benchmarks/sliding_routes.py` (168 shapes, forward and training step, each timed both
ways on a 2-core CPU; its results are in benchmarks/README.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ...errors import SurgeonError
from .band import band_plan

BLOCKED, MASKED, FLEX, SDPA = "blocked", "masked", "flex", "sdpa"
# what a recipe's `kernel:` may say; the kernels' `method` also takes the two sdpa routes by name
KERNELS = ("auto", SDPA, FLEX)
METHODS = ("auto", SDPA, BLOCKED, MASKED, FLEX)
# FlexAttention's block (128 queries): shorter query sets — decode steps with a KV cache — would
# pay a block mask and a kernel launch for a fraction of one block; they keep the sdpa routes
FLEX_MIN_QUERIES = 128
_FLEX_AUTO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# A (B, n_q, n_k) mask per call: beyond ~1M scores per batch element it is no longer small,
# and by then the band's plan is cheaper anyway for any window that is not nearly dense. The
# whole batch's mask stays under 32 MiB as floats (the kernel takes it additive).
MASKED_MAX_SCORES = 1 << 20
MASKED_MAX_BATCH_SCORES = 1 << 23
_BLOCKED_SCORE_COST = 1.7  # forward and training step weigh alike: the route serves both
_CALL_COST = 6.5e6
_GLOBAL_SCORES_PER_QUERY = 80


def choose_kernel(
    method: str, *, device_type: str, dtype: torch.dtype, n_q: int, dropout: float = 0.0, what: str = "attention",
) -> str:  # fmt: skip
    """"flex" or "sdpa" for a `method` of METHODS (the two sdpa routes count as "sdpa"). "auto":
    flex on CUDA for fp32/fp16/bf16 without attention dropout (FlexAttention has none) and at least
    FLEX_MIN_QUERIES queries; sdpa otherwise."""
    if method not in METHODS:
        raise SurgeonError(f"{what}: kernel method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == FLEX:
        return FLEX
    if method != "auto":
        return SDPA
    use_flex = device_type == "cuda" and dtype in _FLEX_AUTO_DTYPES and dropout == 0.0 and n_q >= FLEX_MIN_QUERIES
    return FLEX if use_flex else SDPA


def choose_route(
    method: str, *, batch: int, heads: int, head_dim: int, n_q: int, n_k: int, lo: int, hi: int,
    dilations: Sequence[int] = (1,), has_global: bool = False, block_size: int | None = None,
    device_type: str = "cpu", dtype: torch.dtype = torch.float32, dropout: float = 0.0,
) -> str:  # fmt: skip
    """"flex", "blocked" or "masked": `method` itself when it names a route; else the kernel family
    by `choose_kernel` and, on sdpa, the route the cost model expects to be faster for this shape."""
    kernel = choose_kernel(method, device_type=device_type, dtype=dtype, n_q=n_q, dropout=dropout,
                           what="sliding-window attention")  # fmt: skip
    if kernel == FLEX:
        return FLEX
    if method in (BLOCKED, MASKED):
        return method
    cheaper = masked_is_cheaper(batch, heads, head_dim, n_q, n_k, lo, hi, dilations, has_global, block_size)
    return MASKED if cheaper else BLOCKED


def masked_is_cheaper(
    batch: int, heads: int, head_dim: int, n_q: int, n_k: int, lo: int, hi: int,
    dilations: Sequence[int], has_global: bool, block_size: int | None,
) -> bool:  # fmt: skip
    """The cost model: whether one masked call is expected to beat the blocked plan."""
    if n_q * n_k > MASKED_MAX_SCORES or batch * n_q * n_k > MASKED_MAX_BATCH_SCORES:
        return False
    return _masked_is_cheaper(batch, heads, head_dim, n_q, n_k, lo, hi, tuple(dilations), has_global, block_size)


@functools.lru_cache(maxsize=256)  # a model asks the same question in every layer and step
def _masked_is_cheaper(batch, heads, head_dim, n_q, n_k, lo, hi, dilations, has_global, block_size) -> bool:
    group_heads = heads // len(dilations)
    blocked = 0.0
    for dil in dilations:  # δ residue bands of ~n/δ positions each (see band.dilated_band)
        n_q_r, n_k_r = -(-n_q // dil), -(-n_k // dil)
        pieces = band_plan(n_q_r, n_k_r, None, lo=lo, hi=hi, q0=n_k_r - n_q_r, block_size=block_size, device="cpu")
        scores = sum(p.scores for p in pieces)
        blocked += dil * (_BLOCKED_SCORE_COST * scores * group_heads * head_dim + _CALL_COST * len(pieces))
    if has_global:
        blocked += _GLOBAL_SCORES_PER_QUERY * n_q * heads * head_dim + 2 * _CALL_COST
    masked = batch * n_q * n_k * heads * head_dim + _CALL_COST * len(dilations)
    return masked < batch * blocked
