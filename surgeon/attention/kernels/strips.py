"""Overlapping key strips as a view, with a fast gradient.

The windowed kernel gives each block of c queries the strip of L keys it can see; consecutive
strips start c keys apart and overlap by L - c. Forward they are one `as_strided` view of the
keys (no copy). Backward, autograd's generic `as_strided` gradient for overlapping views goes
through a storage-sized scatter with index_add and copies: it took 52 % of a training step of
`sliding_window_attention` (n = 2048, ±256, 12 heads), more than the fused attention's forward
and backward together. Here the gradient sums the strips back in ⌈L / c⌉ shifted adds instead:
chunk t of every strip (keys t·c … t·c + c - 1) lands on disjoint positions, so each add is one
strided in-place add over all strips at once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def overlapping_strips(x: Tensor, start: int, count: int, step: int, length: int) -> Tensor:
    """x: (H, n, D) -> (count, H, length, D), strip i = x[:, start + i·step : start + i·step + length].
    Every strip must lie inside [0, n)."""
    n = x.shape[1]
    if start < 0 or start + (count - 1) * step + length > n:
        raise ValueError(f"strips [{start}, {start + (count - 1) * step + length}) exceed the {n} rows")
    return _Strips.apply(x, start, count, step, length)


def _strip_view(x: Tensor, start: int, count: int, step: int, length: int) -> Tensor:
    h, _, d = x.shape
    s = x.stride()
    return x.as_strided((count, h, length, d), (step * s[1], s[0], s[1], s[2]), x.storage_offset() + start * s[1])


class _Strips(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, start, count, step, length):
        ctx.geometry = (x.shape, start, count, step, length)
        return _strip_view(x, start, count, step, length)

    @staticmethod
    def backward(ctx, grad):  # grad: (count, H, length, D)
        shape, start, count, step, length = ctx.geometry
        out = grad.new_zeros(shape)  # (H, n, D)
        add_strips_(out, grad, start, count, step, length)
        return out, None, None, None, None


def add_strips_(target: Tensor, grad: Tensor, start: int, count: int, step: int, length: int) -> None:
    """target (H, n, D) += the strips' gradient grad (count, H, length, D), overlaps summed."""
    for t0 in range(0, length, step):
        width = min(step, length - t0)
        # keys t0 … t0 + width - 1 of strip i sit at rows start + t0 + i·step + r: no two
        # strips share a row within one chunk, so one in-place add covers them all
        rows = _strip_view(target, start + t0, count, step, width)  # (count, H, width, D)
        rows += grad[:, :, t0 : t0 + width]
