"""FSDP2 for `surgeon train --strategy fsdp`: PyTorch's `fully_shard` (Zhao et al. 2023, "PyTorch
FSDP"; the per-parameter DTensor version), on a CPU (gloo) or CUDA (nccl) device mesh.

- `shard(root, layers_of, mesh)`: every transformer layer (the classes transformers lists in a
  model's `_no_split_modules`) becomes its own FSDP unit, whatever is left (embeddings, final
  norm, head, a scaffold head) the root's. FSDP2 shards per parameter, so frozen base tensors
  and trainable ones (LoRA, adapters, BitFit biases) share a unit freely; gradients exist (and are
  reduce-scattered, averaged over ranks as DDP averages them) only for the trainable ones.
- `materialize(root, sources, device)`: the model was built on the meta device; only now is
  memory allocated, for this rank's shard only, and each shard is read as its rows of the stored
  tensor (safetensors reads a slice without the rest), so no rank holds the whole base.
  FSDP2 keeps rank r's rows of a parameter as `torch.chunk(full, world, dim=0)[r]`.
- `gather(root, names)`: the full tensors, one at a time, kept on rank 0 only (for the diff and
  the checkpoints); `non_finite_anywhere`: inf/NaN in any rank's shard, agreed by every rank.

The CPU path calls `fully_shard` directly because accelerate sets its FSDP type only for GPU-like
backends (on CPU it silently runs DDP); the GPU path uses the same calls on a CUDA mesh rather
than accelerate's FSDP2 plugin, whose `prepare` expects a materialised model (or rank 0's full
state dict, broadcast) — either puts the whole base in one process's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ..errors import SurgeonError
from .checkpoints import non_finite
from .meta_load import Stored


# glibc mallopt parameter (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 128 * 1024


def return_freed_memory() -> bool:
    """Make glibc serve large allocations with mmap, so that a freed one goes back to the OS.

    FSDP frees each layer's gathered weights after its forward and gathers them again for the
    backward. glibc raises its mmap threshold to the size of every mmapped block freed (its
    "dynamic threshold", up to 32 MiB), so from the second layer on those buffers come from the
    heap, which keeps what is freed: measured on a 310 MiB Llama in 2 gloo processes, each
    rank's peak RSS over 3 steps was 1125 MiB with the default and 449 MiB with this call (ddp:
    781 MiB; benchmarks/fsdp_memory.py). Fixing the threshold turns the dynamic one off.
    Returns whether it was set (glibc on Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def device_mesh(device: torch.device, world: int):
    """The 1-D mesh of all ranks on `device`'s type (the default process group's backend)."""
    return init_device_mesh(device.type, (world,))


def layer_modules(root: nn.Module, models: list[nn.Module]) -> list[nn.Module]:
    """The units to shard under `root`: instances of the classes `models` keep whole
    (transformers' `_no_split_modules`, the unit accelerate's FSDP wrapping uses too), except a
    unit holding a parameter that a module outside it holds as well (BERT's embeddings, tied to
    the MLM decoder): FSDP2 needs a shared parameter inside one unit, so it stays with the root."""
    classes = {name for model in models for name in (getattr(model, "_no_split_modules", None) or [])}
    holders: dict[int, set[int]] = {}
    for module in root.modules():
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), set()).add(id(module))
    units = []
    for module in root.modules():
        if type(module).__name__ not in classes or module in models:
            continue
        inside = {id(m) for m in module.modules()}
        if all(holders[id(p)] <= inside for p in module.parameters()):
            units.append(module)
    if not units:
        raise SurgeonError(
            f"train: --strategy fsdp: {type(models[0]).__name__} names no layer class to shard by "
            "(transformers' _no_split_modules); use --strategy ddp"
        )
    return units


def shard(root: nn.Module, models: list[nn.Module], mesh) -> None:
    """fully_shard each layer of `models` under `root`, then `root` (which holds the rest)."""
    for layer in reversed(layer_modules(root, models)):  # inner units first, as fully_shard requires
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)


def rows_of(full_rows: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's rows under torch.chunk(…, world, dim=0), as FSDP2 shards."""
    per_rank = math.ceil(full_rows / world) if full_rows else 0
    start = min(full_rows, rank * per_rank)
    return start, min(full_rows, start + per_rank)


class _Files:
    """Open safetensors handles, one per file, for the reads of one materialisation."""

    def __init__(self):
        self.handles = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles = {}

    def rows(self, stored: Stored, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        from safetensors import safe_open

        handle = self.handles.get(stored.path)
        if handle is None:
            handle = self.handles[stored.path] = safe_open(stored.path, framework="pt").__enter__()
        piece = handle.get_slice(stored.key)
        if start is None or not piece.get_shape():
            return piece[:] if piece.get_shape() else handle.get_tensor(stored.key)
        return piece[start:stop]


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def copy_shard(param: torch.Tensor, full_or_rows, rank: int, world: int, name: str) -> None:
    """Copy into `param` (a DTensor sharded on dim 0, or a plain tensor) its part of the full
    tensor; `full_or_rows(start, stop)` returns those rows of the full tensor."""
    local = local_part(param)
    if isinstance(param, DTensor):
        start, stop = rows_of(param.shape[0], rank, world)
        values = full_or_rows(start, stop)
    else:
        values = full_or_rows(None, None)
    if tuple(values.shape) != tuple(local.shape):
        raise SurgeonError(
            f"train: --strategy fsdp: tensor {name}: stored rows have shape {tuple(values.shape)}, this "
            f"rank's shard {tuple(local.shape)}"
        )
    with torch.no_grad():
        local.copy_(values.to(local.dtype))


def materialize(
    root: nn.Module, sources: dict[str, Stored], device: torch.device, rank: int, world: int
) -> None:
    """Allocate `root`'s tensors on `device` (this rank's shard of each parameter) and fill them:
    a tensor named in `sources` from its file (its rows only), any other (a scaffold head built
    in memory, computed buffers) with the values it had before."""
    kept = {}
    for name, tensor in [*root.named_parameters(), *root.named_buffers()]:
        if name not in sources:
            if local_part(tensor).is_meta:
                raise SurgeonError(f"train: --strategy fsdp: {name} has no stored values and none in memory")
            kept[name] = local_part(tensor).detach().clone()
    root.to_empty(device=device)
    with _Files() as files:
        for name, tensor in [*root.named_parameters(), *root.named_buffers()]:
            if name in sources:
                stored = sources[name]
                copy_shard(tensor, lambda a, b, s=stored: files.rows(s, a, b), rank, world, name)
            else:
                with torch.no_grad():
                    local_part(tensor).copy_(kept[name])


def set_full(
    params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], rank: int, world: int
) -> None:
    """Copy full tensors (e.g. a checkpoint's) into sharded parameters, each rank its rows."""
    for name, full in tensors.items():
        copy_shard(params[name], lambda a, b, f=full: f if a is None else f[a:b], rank, world, name)


def gather(params: dict[str, torch.Tensor], names: list[str], main: bool) -> dict[str, torch.Tensor]:
    """name -> full tensor (CPU) on the main rank, {} elsewhere; every rank must call it (each
    tensor is all-gathered in turn, so the peak is one full tensor beyond the shards)."""
    out = {}
    for name in names:
        tensor = params[name].detach()
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if main:
            out[name] = full.to("cpu").contiguous()
        del full
    return out


def non_finite_anywhere(params: dict[str, torch.Tensor], names: list[str]) -> tuple[str, str] | None:
    """(name, "NaN"/"inf") of the first trained tensor with a non-finite value in any rank's shard;
    the same answer on every rank."""
    mine = non_finite({n: local_part(params[n]).detach() for n in names})
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    found = [f for f in every if f is not None]
    return min(found, key=lambda f: names.index(f[0])) if found else None


__all__ = [
    "device_mesh",
    "gather",
    "layer_modules",
    "materialize",
    "non_finite_anywhere",
    "set_full",
    "shard",
]
