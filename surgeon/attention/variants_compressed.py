"""Attention variants that compress or bucket the key-value memory (see `interface.py`).

- `LinformerAttention` (Wang et al. 2020) and `LatentAttention` (Perceiver, Jaegle et al.
  2021) own learned tensors, so they are `nn.Module`s attached as the child
  `surgeon_attention` of the attention module: their tensors are in the state dict, hence in
  the diff and counted as added parameters.
- `LSHAttention` (Reformer, Kitaev et al. 2020) has no parameters: a plain object.

Each has `cost(n, heads, head_dim) -> {"flops", "score_bytes"}` for the report. Variants refuse,
at run time, what their action's `check` could not see: a sequence longer than Linformer's
max_length, a T5-style position bias. They never fall back to dense silently for inputs they
were chosen for.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import SurgeonError
from .kernels.latent import latent_attention, latent_cost
from .kernels.linformer import (
    linformer_attention,
    linformer_cost,
    random_projection,
    segment_mean_projection,
)
from .kernels.lsh import lsh_attention, lsh_cost

LinformerInit = Literal["segment_mean", "random"]


def _refuse_bias(name: str, where: str, kwargs: dict) -> None:
    if kwargs.get("position_bias") is not None:
        raise SurgeonError(
            f"{name}: {where} receives an additive position bias (T5-style), which {name} "
            "attention cannot apply; use it on models without one"
        )


class LinformerAttention(nn.Module):
    """softmax(Q·(E·K)ᵀ·scale)·(F·V) with E, F of shape (k, max_length).

    share: "none" — E and F per layer (one for all heads of the layer: the paper's headwise
    sharing); "kv" — F = E; "layer" — one E = F for every patched layer. With "layer" the first
    layer's variant owns the tensor and the others hold a reference that is not registered as
    their parameter, so the state dict, diff and parameter count hold it once.
    """

    name = "linformer"

    def __init__(
        self,
        k: int,
        max_length: int,
        *,
        share: Literal["none", "kv", "layer"] = "none",
        init: LinformerInit = "segment_mean",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        shared: nn.Parameter | None = None,
        local_window: int = 0,
        kernel: str = "auto",
        where: str = "",
    ):
        super().__init__()
        self.k, self.max_length, self.share, self.where = k, max_length, share, where
        self.local_window, self.kernel = local_window, kernel  # kernel: the band's (kernels.route.KERNELS)
        self._shared: list[nn.Parameter] = [] if shared is None else [shared]
        if shared is None:
            generator = torch.Generator().manual_seed(seed)
            self.proj_k = nn.Parameter(self._init(init, generator, dtype, device))
            if share == "none":
                self.proj_v = nn.Parameter(self._init(init, generator, dtype, device))

    def _init(self, init: LinformerInit, generator, dtype, device) -> Tensor:  # (k, max_length)
        if torch.device(device).type == "meta":  # a dry run: shapes only, nothing computed
            return torch.empty(self.k, self.max_length, dtype=dtype, device="meta")
        if init == "segment_mean":
            proj = segment_mean_projection(self.k, self.max_length)
        else:
            proj = random_projection(self.k, self.max_length, generator=generator)
        return proj.to(dtype=dtype, device=device)

    def projections(self) -> tuple[Tensor, Tensor]:
        if self._shared:
            return self._shared[0], self._shared[0]
        return self.proj_k, getattr(self, "proj_v", self.proj_k)

    def forward_attention(
        self, module, query, key, value, *, key_padding_mask, scaling, dropout, causal, **kwargs
    ):
        if causal:
            raise SurgeonError(f"linformer: {self.where} is causal; Linformer mixes future tokens")
        _refuse_bias(self.name, self.where, kwargs)
        if key.shape[2] > self.max_length:
            raise SurgeonError(
                f"linformer: {self.where}: input of {key.shape[2]} tokens exceeds max_length "
                f"{self.max_length}"
            )
        proj_k, proj_v = self.projections()
        return linformer_attention(
            query, key, value, proj_k, proj_v,
            key_padding_mask=key_padding_mask, scaling=scaling, dropout=dropout, local_window=self.local_window,
            method=self.kernel,
        )  # fmt: skip

    def cost(self, n: int, heads: int, head_dim: int) -> dict:
        return linformer_cost(n, heads, head_dim, self.k, self.local_window)

    def extra_repr(self) -> str:
        kernel = f", kernel={self.kernel}" if self.kernel != "auto" else ""
        return f"k={self.k}, max_length={self.max_length}, share={self.share}, local_window={self.local_window}{kernel}"


class LatentAttention(nn.Module):
    """m learned latent queries per KV head summarise K, V; tokens attend to the m slots."""

    name = "latent"

    def __init__(self, m: int, kv_heads: int, head_dim: int, *, seed: int = 0,
                 summary_keys: Literal["attended", "latent"] = "latent", local_window: int = 0,
                 kernel: str = "auto", dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 where: str = ""):  # fmt: skip
        super().__init__()
        self.m, self.summary_keys, self.local_window, self.where = m, summary_keys, local_window, where
        self.kernel = kernel  # the band's (kernels.route.KERNELS)
        if torch.device(device).type == "meta":  # a dry run: shapes only, nothing computed
            latents = torch.empty(kv_heads, m, head_dim, dtype=dtype, device="meta")
        else:
            # Unit-variance entries: with the model's own scaling (1/√D) a latent's scores have the
            # spread of a typical query's, so each slot starts as a soft cluster of related tokens.
            generator = torch.Generator().manual_seed(seed)
            latents = torch.randn(kv_heads, m, head_dim, generator=generator).to(dtype=dtype, device=device)
        self.latents = nn.Parameter(latents)

    def forward_attention(
        self, module, query, key, value, *, key_padding_mask, scaling, dropout, causal, **kwargs
    ):
        if causal:
            raise SurgeonError(f"latent: {self.where} is causal; latent slots mix future tokens")
        _refuse_bias(self.name, self.where, kwargs)
        return latent_attention(
            query, key, value, self.latents,
            key_padding_mask=key_padding_mask, scaling=scaling, dropout=dropout,
            summary_keys=self.summary_keys, local_window=self.local_window, method=self.kernel,
        )  # fmt: skip

    def cost(self, n: int, heads: int, head_dim: int) -> dict:
        return latent_cost(n, heads, head_dim, self.m, self.summary_keys, self.local_window)

    def extra_repr(self) -> str:
        kernel = f"kernel={self.kernel}, " if self.kernel != "auto" else ""
        return (f"m={self.m}, summary_keys={self.summary_keys}, local_window={self.local_window}, {kernel}"
                f"latents={tuple(self.latents.shape)}")  # fmt: skip


class LSHAttention:
    """Reformer LSH attention with the model's own Q and K; no learned parameters."""

    name = "lsh"

    def __init__(self, n_hashes: int, bucket_size: int, *, seed: int = 0, shared_qk: bool = False,
                 where: str = ""):  # fmt: skip
        self.n_hashes, self.bucket_size, self.seed = n_hashes, bucket_size, seed
        self.shared_qk, self.where = shared_qk, where

    def forward_attention(
        self, module, query, key, value, *, key_padding_mask, scaling, dropout, causal, **kwargs
    ):
        if causal:
            raise SurgeonError(f"lsh: {self.where} is causal; LSH buckets depend on later tokens")
        _refuse_bias(self.name, self.where, kwargs)
        if query.shape[2] != key.shape[2]:
            return None  # not self-attention over one sequence (a cache): exact dense instead
        return lsh_attention(
            query, key, value,
            n_hashes=self.n_hashes, bucket_size=self.bucket_size, seed=self.seed,
            key_padding_mask=key_padding_mask, scaling=scaling, shared_qk=self.shared_qk,
            dropout=dropout,
        )  # fmt: skip

    def cost(self, n: int, heads: int, head_dim: int) -> dict:
        return lsh_cost(n, heads, head_dim, self.n_hashes, self.bucket_size)

    def __repr__(self) -> str:
        return (f"LSHAttention(n_hashes={self.n_hashes}, bucket_size={self.bucket_size}, "
                f"seed={self.seed}, shared_qk={self.shared_qk})")  # fmt: skip


def kv_heads_and_dim(module: nn.Module) -> tuple[int, int] | None:
    """(KV heads, head dim) of a transformers attention module, or None if it doesn't say."""
    config = getattr(module, "config", None)
    heads = (getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
             or getattr(config, "num_attention_heads", None))  # fmt: skip
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
    if head_dim is None and config is not None and heads:
        head_dim = getattr(config, "hidden_size", 0) // heads or None
    if not heads or not head_dim:
        return None
    groups = getattr(module, "num_key_value_groups", 1) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads // groups
    return int(kv_heads), int(head_dim)


def max_positions(model: nn.Module) -> int | None:
    """The longest input the model's position table allows, if it has one."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
