"""The local-attention patterns the flex benchmarks time (attention_cuda.py, attention_flex_cpu.py),
each runnable on either kernel family: `run(q, k, v, kernel)` with kernel "flex" or "sdpa"
(surgeon.attention.kernels.route.KERNELS). q, k, v: (B, H, n, D) on any device and dtype."""

from __future__ import annotations

import torch

from surgeon.attention.kernels.blockwise import blockwise_attention
from surgeon.attention.kernels.latent import latent_attention
from surgeon.attention.kernels.sliding import sliding_window_attention


def _global0(q: torch.Tensor) -> torch.Tensor:  # (B, n) bool: position 0 is global
    glob = torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
    glob[:, 0] = True
    return glob


_latents: dict = {}


def _latents_for(q: torch.Tensor, m: int = 256) -> torch.Tensor:  # (H, m, D), one per device and dtype
    key = (q.device, q.dtype, q.shape[1], q.shape[3])
    if key not in _latents:
        g = torch.Generator().manual_seed(0)
        _latents[key] = torch.randn(q.shape[1], m, q.shape[3], generator=g).to(q.device, q.dtype)
    return _latents[key]


PATTERNS = [
    {
        "name": "sliding ±256",
        "causal": False,
        "run": lambda q, k, v, kernel: sliding_window_attention(
            q, k, v, window=512, causal=False, method=kernel
        ),
    },
    {
        "name": "sliding ±256 + global [0]",
        "causal": False,
        "run": lambda q, k, v, kernel: sliding_window_attention(
            q, k, v, window=512, causal=False, global_mask=_global0(q), method=kernel
        ),
    },
    {
        "name": "sliding ±256 dilation [1,1,2,2]",
        "causal": False,
        "run": lambda q, k, v, kernel: sliding_window_attention(
            q, k, v, window=512, causal=False, dilation=[1, 1, 2, 2], method=kernel
        ),
    },
    {
        "name": "sliding causal 512",
        "causal": True,
        "run": lambda q, k, v, kernel: sliding_window_attention(
            q, k, v, window=512, causal=True, method=kernel
        ),
    },
    {
        "name": "blockwise 16 blocks, 2 perms",
        "causal": False,
        "run": lambda q, k, v, kernel: blockwise_attention(
            q, k, v, block_size=q.shape[2] // 16, causal=False, permutations=2, method=kernel
        ),
    },
    {
        "name": "latent m=256 + band ±8",
        "causal": False,
        "run": lambda q, k, v, kernel: latent_attention(
            q,
            k,
            v,
            _latents_for(q),
            key_padding_mask=None,
            scaling=q.shape[-1] ** -0.5,
            local_window=16,
            method=kernel,
        ),
    },
]
