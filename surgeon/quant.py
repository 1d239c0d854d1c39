"""Quantised frozen weights through torchao: NF4 (Dettmers et al. 2023, "QLoRA") and int8 weight-only.

torchao keeps the module an `nn.Linear` and swaps its weight for a tensor subclass whose
`F.linear` dequantises on the fly (NF4: block-wise absmax over 4-bit normal-float levels, with the
block scalers themselves quantised to int8 in blocks of `scaler_block_size` — the paper's
"double quantisation"; int8: symmetric absmax per output row or per group of `block_size` inputs).
Both run on CPU with torch 2.13 and torchao 0.18; bitsandbytes 0.50 runs there too but its
forward + backward was ~2x slower in the probe and replaces the module class (Linear4bit).

Quantisation is a pure function of the weight's values and the spec, so a diff never stores the
quantised tensors: loading re-applies the rule to the same base and gets the same bits.
torchao is an optional dependency (`pip install 'surgeon[quant]'`); it is imported on first use.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch

from .errors import SurgeonError

FORMATS = ("nf4", "int8")
INSTALL_HINT = "pip install 'surgeon[quant]' (torchao>=0.17)"


@dataclass(frozen=True)
class QuantSpec:
    """How one weight is stored: `format` nf4 | int8; `block_size` elements per absmax scale
    (nf4: consecutive elements of the flattened weight; int8: input columns per group, None = one
    scale per output row); `scaler_block_size` (nf4 only): scalers per double-quantisation block."""

    format: str
    block_size: int | None = None
    scaler_block_size: int | None = None

    def describe(self) -> str:
        if self.format == "nf4":
            return f"nf4 (block {self.block_size}, scaler block {self.scaler_block_size})"
        return f"int8 ({'per row' if self.block_size is None else f'groups of {self.block_size}'})"


def _torchao():
    """The torchao module, or a one-line error saying how to install it."""
    try:
        return importlib.import_module("torchao")
    except ImportError:
        raise SurgeonError(f"quantize: needs torchao, which is not installed; {INSTALL_HINT}") from None


def available() -> bool:
    try:
        _torchao()
    except SurgeonError:
        return False
    return True


def shape_problem(shape: tuple[int, ...], spec: QuantSpec) -> str | None:
    """Why a weight of this (out, in) shape cannot be stored in `spec`, or None."""
    out_f, in_f = shape
    if spec.format == "nf4":
        numel = out_f * in_f
        if numel % spec.block_size:
            return f"its {numel:,} elements are not a multiple of block_size={spec.block_size}"
        scalers = numel // spec.block_size
        if scalers % spec.scaler_block_size:
            fits = math.gcd(scalers, spec.scaler_block_size)
            return (
                f"its {scalers:,} block scalers are not a multiple of scaler_block_size="
                f"{spec.scaler_block_size} (scaler_block_size: {fits} would fit)"
            )
    elif spec.block_size is not None and in_f % spec.block_size:
        return f"its {in_f} input features are not a multiple of block_size={spec.block_size}"
    return None


def quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The torchao tensor holding `weight` (out, in) quantised; computed in fp32."""
    _torchao()
    dense = weight.detach().to(torch.float32)
    if spec.format == "nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        return to_nf4(dense, block_size=spec.block_size, scaler_block_size=spec.scaler_block_size)
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerGroup, PerRow

    granularity = PerRow() if spec.block_size is None else PerGroup(spec.block_size)
    return Int8Tensor.from_hp(dense, granularity=granularity)


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a torchao quantised tensor (without importing torchao)."""
    return type(tensor).__module__.startswith("torchao.")


def dequantize(tensor: torch.Tensor) -> torch.Tensor:
    """The fp32 values the quantised tensor stands for (what the model computes with)."""
    if not is_quantized(tensor):
        return tensor.detach().to(torch.float32)
    if hasattr(tensor, "get_original_weight"):  # NF4Tensor
        return tensor.get_original_weight().to(torch.float32)
    return tensor.dequantize().to(torch.float32)


def roundtrip(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """dequantize(quantize(weight)): the fp32 weight a quantised model computes with."""
    return dequantize(quantize(weight, spec))


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the tensors a quantised tensor keeps (codes, scales, lookup table)."""
    if not is_quantized(tensor):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    inner = [getattr(tensor, name) for name in names]
    return sum(t.numel() * t.element_size() for t in inner)


def expected_bytes(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Bytes `quantize` stores for an (out, in) weight, computed from the shape alone (the report
    works from config.json on the meta device); tests check it against `stored_bytes`."""
    out_f, in_f = shape
    numel = out_f * in_f
    if spec.format == "nf4":
        scalers = numel // spec.block_size
        # 4-bit codes two per byte; int8 scalers; one fp32 factor per scaler block; fp32 scaler
        # mean; the 16 fp32 NF4 levels
        return numel // 2 + scalers + 4 * (scalers // spec.scaler_block_size) + 4 + 16 * 4
    groups = 1 if spec.block_size is None else in_f // spec.block_size
    return numel + out_f * groups * (4 + 1)  # int8 codes; fp32 scale + int8 zero point per group
