"""LoRA math (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    h = W0·x + (alpha / r)·B·A·x          A: (r, in), B: (out, r)
    rsLoRA (Kalajdzievski 2023) scales by alpha / √r instead of alpha / r.

Init (`init:`):
- `default`: A kaiming-uniform (as nn.Linear), B zero — outputs unchanged at init (the paper's
  choice). On nn.Embedding the roles swap as in PEFT: A zero, B normal — also unchanged at init,
  and it keeps B's gradient from depending on a near-zero gather of a vocabulary-wide A.
- `gaussian`: A ~ N(0, 1/r), B zero (PEFT's `init_lora_weights="gaussian"`).
- `random`: A and B both random, so outputs change at init. Only useful to test merges.

Lean training (issue §3). PEFT applies, per LoRA layer, its own dropout (which saves a mask and
the dropped copy of the input for A's gradient) and its own cast; q, k and v repeat this on one
input. Here:
- adapters that read the same input tensor form an `InputGroup` (q/k/v of one attention, gate/up
  of one MLP, the parts of a fused qkv): one dropout mask, one cast and ONE matmul against the
  concatenated A's serve all of them (the mask is shared, the paper does not prescribe
  independent masks);
- `_MaskedProject` saves only the input itself and a seed, and regenerates the dropout mask in
  backward: nothing of input size is stored beyond the input, and no cast copy is stored when
  the adapter dtype differs from the input's (the cast is redone in backward).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("linear", "conv1d", "embedding")

# Dropout keeps an element when a uniform int16 draw is at or above a threshold: p is quantised
# to 1/65536 (0.05 -> 0.0500031). The draws come as full-range int64 words viewed as four int16
# lanes: one generator call per four elements, ~4x cheaper than bernoulli_ on CPU. The mask is
# drawn twice (forward and backward), so its cost matters.
_LEVELS = 65536


def _keep_mask(shape, p: float, seed: int, device) -> tuple[torch.Tensor, float]:
    """(bool mask of kept elements, 1 / keep probability); the same seed gives the same mask."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=gen)  # every 64-bit pattern equally likely
    bits = words.view(torch.int16)[:n].view(shape)
    drop = round(p * _LEVELS)
    return bits >= (drop - 32768), _LEVELS / (_LEVELS - drop)


class _MaskedProject(torch.autograd.Function):
    """u = dropout(x) @ Aᵀ, saving x (no copy) and a seed instead of the dropped input.

    x: (..., in) in any dtype; a: (R, in) — the A matrices of a whole input group stacked.
    """

    @staticmethod
    def forward(ctx, x, a, p: float, seed: int):
        xc = x.to(a.dtype)  # (..., in); no copy when dtypes match
        if p > 0:
            keep, rescale = _keep_mask(xc.shape, p, seed, xc.device)
            u = F.linear(torch.where(keep, xc, 0), a)  # (..., R)
            u.mul_(rescale)  # rescale the small output, not the input
        else:
            u = F.linear(xc, a)
        ctx.save_for_backward(x, a)
        ctx.p, ctx.seed = p, seed
        return u

    @staticmethod
    def backward(ctx, grad_u):
        x, a = ctx.saved_tensors
        p = ctx.p
        grad_u = grad_u.to(a.dtype)
        g = grad_u.reshape(-1, a.shape[0])  # (N, R)
        keep, rescale = (None, 1.0)
        if p > 0:
            keep, rescale = _keep_mask(x.shape, p, ctx.seed, x.device)
        if rescale != 1.0:
            g = g * rescale
        grad_x = grad_a = None
        if ctx.needs_input_grad[1]:
            xd = x.to(a.dtype)
            xd = torch.where(keep, xd, 0) if keep is not None else xd
            grad_a = g.t() @ xd.reshape(-1, a.shape[1])  # (R, in)
        if ctx.needs_input_grad[0]:
            grad_x = (g @ a).reshape(x.shape)  # (..., in)
            if keep is not None:
                grad_x = torch.where(keep, grad_x, 0)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_a, None, None


def project(x: torch.Tensor, a: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(x) @ Aᵀ → (..., R); the lean autograd path when gradients are needed."""
    if p > 0 or (torch.is_grad_enabled() and (x.requires_grad or a.requires_grad)):
        # the seed comes from the global generator, so torch.manual_seed reproduces runs and
        # activation checkpointing (which restores RNG state) regenerates the same mask
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        return _MaskedProject.apply(x, a, p, seed)
    return F.linear(x.to(a.dtype), a)


class InputGroup:
    """Adapters whose modules read one input tensor. The first member called projects the
    input through every live member's A at once; the others pick up their slice, provided the
    input is the very same tensor (identity and version), so a wrong grouping only costs
    compute, never correctness."""

    def __init__(self, key: tuple):
        self.key = key
        self.members: list[LoraAdapter] = []
        self._clear()

    def _clear(self) -> None:
        self._ref = None
        self._stamp = None
        self._pending: dict[int, torch.Tensor] = {}

    def __getstate__(self):  # deepcopy / pickle: cached activations never travel
        state = dict(self.__dict__)
        state.update(_ref=None, _stamp=None, _pending={})
        return state

    def project(self, member: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        live = [m for m in self.members if m.live and m.lora_A.dtype == member.lora_A.dtype]
        if member not in live:
            live = [member]
        stamp = (
            x._version,
            torch.is_grad_enabled(),
            member.training,
            tuple((id(m), id(m.lora_A), m.lora_A._version, m.dropout) for m in live),
        )
        if self._ref is not None and self._ref() is x and self._stamp == stamp:
            cached = self._pending.pop(id(member), None)
            if cached is not None:
                return cached
        p = member.dropout if member.training else 0.0
        if len(live) == 1 or any(m.dropout != member.dropout for m in live):
            self._clear()
            return project(x, member.lora_A, p)
        a = torch.cat([m.lora_A for m in live])  # (R, in)
        parts = project(x, a, p).split([m.r for m in live], dim=-1)
        self._ref, self._stamp = weakref.ref(x), stamp
        self._pending = {id(m): u for m, u in zip(live, parts) if m is not member}
        return parts[live.index(member)]


class LoraAdapter(nn.Module):
    """One LoRA pair on one module, or on one part of a fused projection (`out_range`)."""

    def __init__(
        self,
        kind: str,
        in_features: int,
        out_features: int,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "default",
        out_range: tuple[int, int] | None = None,
        untie: bool = False,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown LoRA kind {kind!r}")
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scale = self.alpha / (math.sqrt(r) if rslora else r)
        self.dropout = 0.0 if kind == "embedding" else float(dropout)  # PEFT: none on embeddings
        self.out_range = tuple(out_range) if out_range is not None else None
        self.untie = untie
        self.padding_idx = padding_idx
        self.lora_A = nn.Parameter(torch.empty((r, in_features), device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty((out_features, r), device=device, dtype=dtype))
        # switches (set by surgeon.lora.set_active / disable_adapters / merge)
        self.active = True
        self.disabled = False
        self.merged = False
        self.group: InputGroup | None = None
        self.reset_parameters(init)

    @property
    def live(self) -> bool:
        """Whether this adapter adds its output in forward now."""
        return self.active and not self.disabled and not self.merged

    def reset_parameters(self, init: str = "default") -> None:
        with torch.no_grad():
            if self.kind == "embedding" and init == "default":
                nn.init.zeros_(self.lora_A)
                nn.init.normal_(self.lora_B)
                return
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init == "random":
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        where = f", out[{self.out_range[0]}:{self.out_range[1]}]" if self.out_range else ""
        return (
            f"{self.kind}, r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, "
            f"dropout={self.dropout:g}{where}"
        )

    # ---- forward pieces ---------------------------------------------------------------
    def down(self, x: torch.Tensor) -> torch.Tensor:
        """A·dropout(x) → (..., r), through the input group when there is one."""
        if self.kind == "embedding":
            # x are token ids; Aᵀ is (num_embeddings, r)
            return F.embedding(x, self.lora_A.t(), padding_idx=self.padding_idx)
        if self.group is not None:
            return self.group.project(self, x)
        return project(x, self.lora_A, self.dropout if self.training else 0.0)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """B·A·dropout(x), unscaled → (..., out)."""
        return F.linear(self.down(x), self.lora_B)

    # ---- merge ------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """scale·B·A in fp32, in the base weight's own layout: nn.Linear (out, in);
        Conv1D (in, out); nn.Embedding (num_embeddings, dim)."""
        delta = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale  # (out, in)
        return delta if self.kind == "linear" else delta.t()
