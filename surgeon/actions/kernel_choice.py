"""The `kernel:` parameter of the local-attention actions: which kernel family computes the pattern.

- auto (default): by device — FlexAttention on CUDA, the fused sdpa routes on the CPU
  (attention/kernels/route.py, `choose_kernel`);
- sdpa: the fused scaled-dot-product routes (blocked band plan or one masked call) on any device;
- flex: PyTorch's FlexAttention with the pattern as a block mask (attention/kernels/flex.py); on the
  CPU inference only (torch 2.13 has no flex backward there), and never with attention dropout.

The same names as route.KERNELS (tests/test_kernel_flex.py checks the two agree).
"""

from __future__ import annotations

from typing import Literal

import pydantic

Kernel = Literal["auto", "sdpa", "flex"]


def kernel_field():
    return pydantic.Field(
        "auto", description="attention kernel: auto (flex on CUDA, sdpa on CPU), sdpa or flex"
    )


def check_kernel_has_a_band(kernel: str, local_window: int) -> None:
    """Linformer's and the latent slots' kernel choice is the band's: without one it means nothing."""
    if kernel != "auto" and local_window <= 0:
        raise ValueError(f"kernel: {kernel} chooses the route of the local_window band; set local_window > 0")
