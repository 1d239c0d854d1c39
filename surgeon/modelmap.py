"""One walk of a model's module tree: layer stacks, architecture-agnostic roles, targets.

Roles are resolved from structure, not from a table per family:
- a *layer stack* is a ModuleList whose children share one class and contain attention;
- an *attention module* is one whose class calls the transformers attention interface, or,
  for families with their own eager code, one that owns q/k/v (or fused qkv) projections;
- q/k/v/o, MLP up/gate/down are its children (or the layer's), recognised by the small
  name tables below — names differ across families but the structure around them doesn't;
- `head` is whatever sits beside the base model (`model.base_model_prefix`), plus a pooler.
Cross-attention (T5 `EncDecAttention`, BART `encoder_attn`, BERT `crossattention`) gets the
role `xattn` (and `xattn.q` …), never `attn`, so self-attention rules don't touch it.
A fused [q|k|v] projection (GPT-2 `c_attn`) has role `attn.qkv`; `attn.q`/`attn.k`/`attn.v`
then resolve to slices of it (targets with `.fused` set), which only some actions accept.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import re
from dataclasses import dataclass, field

from torch import nn

from .roles import ROLE_NAMES


# Child names of projections, across families (BERT, DistilBERT, GPT-2, Llama/Mistral/Qwen2,
# T5, BART, ViT, Phi, GPT-J, …). Context decides between attention and MLP: GPT-2's `c_proj`
# is attn.o inside the attention module and mlp.down inside the MLP.
_ATTN_NAMES = {
    "q": {"q_proj", "query", "q", "q_lin", "wq", "q_attn", "query_proj"},
    "k": {"k_proj", "key", "k", "k_lin", "wk", "key_proj"},
    "v": {"v_proj", "value", "v", "v_lin", "wv", "value_proj"},
    "o": {"o_proj", "out_proj", "o", "out_lin", "c_proj", "dense", "wo", "out", "proj"},
}
# Fused projections whose output is laid out [q | k | v] contiguously.
_FUSED_QKV_NAMES = {"c_attn", "qkv_proj", "Wqkv", "qkv", "in_proj"}
_MLP_NAMES = {
    # Phi-3's gate_up_proj fuses gate and up: it is `mlp.up` as a whole (no slices).
    "up": {"up_proj", "fc1", "c_fc", "lin1", "wi", "wi_1", "dense_h_to_4h", "fc_in", "w_in", "gate_up_proj"},
    "gate": {"gate_proj", "wi_0"},
    "down": {"down_proj", "fc2", "c_proj", "lin2", "wo", "dense_4h_to_h", "fc_out", "w_out"},
}
_CROSS_NAMES = {"encoder_attn", "EncDecAttention", "crossattention", "cross_attn", "cross_attention"}
_HEAD_NAMES_IN_BASE = {"pooler"}


@dataclass(frozen=True)
class LayerRef:
    """Where a module sits in a layer stack; `index` counts within that stack."""

    stack: str  # path of the stack, e.g. "encoder.layer"
    index: int
    count: int  # number of layers in the stack


@dataclass(frozen=True)
class FusedSlice:
    """A contiguous range of a fused projection's output features (GPT-2 `c_attn` → q, k, v)."""

    part: str  # "q" | "k" | "v"
    start: int
    stop: int


@dataclass(frozen=True, eq=False)
class Target:
    """One thing a rule acts on: a module, or a slice of a fused projection."""

    path: str
    module: nn.Module
    roles: frozenset[str]
    layer: LayerRef | None = None
    fused: FusedSlice | None = None
    attention_path: str | None = None  # the attention module this projection belongs to

    @property
    def class_name(self) -> str:
        return type(self.module).__name__

    @property
    def display(self) -> str:
        name = self.path or "<model>"
        if self.fused is not None:
            return f"{name}[{self.fused.part}:{self.fused.start}:{self.fused.stop}]"
        return name


@dataclass
class _Entry:
    path: str
    module: nn.Module
    roles: set[str] = field(default_factory=set)
    layer: LayerRef | None = None
    attention_path: str | None = None


@functools.lru_cache(maxsize=None)
def _class_calls_interface(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source or "attention_interface" in source


def routes_through_interface(module: nn.Module) -> bool:
    """True if this attention module's forward calls transformers' AttentionInterface."""
    return _class_calls_interface(type(module))


def _children(module: nn.Module) -> dict[str, nn.Module]:
    return dict(module.named_children())


def _is_attention(module: nn.Module) -> bool:
    if _class_calls_interface(type(module)):
        return True
    names = set(_children(module))
    has_qkv = all(names & _ATTN_NAMES[p] for p in "qkv")
    return has_qkv or bool(names & _FUSED_QKV_NAMES) and "attn" in type(module).__name__.lower()


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or (
        "Norm" in name and any(True for _ in module.parameters(recurse=False))
    )


def _is_cross(path: str, module: nn.Module, parent: nn.Module | None) -> bool:
    if getattr(module, "is_cross_attention", False):
        return True
    if path.rsplit(".", 1)[-1] in _CROSS_NAMES:
        return True
    return parent is not None and "Cross" in type(parent).__name__


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _fused_slices(module: nn.Module, attention: nn.Module) -> list[FusedSlice] | None:
    """Split a fused [q | k | v] projection by output features, or None if the layout is unknown."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    # transformers' Conv1D stores (in, out); nn.Linear stores (out, in).
    out_features = weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0]
    config = getattr(attention, "config", None)
    heads = (getattr(attention, "num_heads", None) or getattr(attention, "num_attention_heads", None)
             or getattr(config, "num_attention_heads", None))  # fmt: skip
    head_dim = getattr(attention, "head_dim", None)
    kv_heads = getattr(attention, "num_key_value_heads", None) or getattr(
        config, "num_key_value_heads", None
    )
    if heads and head_dim:
        q_size = heads * head_dim
        kv_size = (kv_heads or heads) * head_dim
    elif out_features % 3 == 0:
        q_size = kv_size = out_features // 3
    else:
        return None
    if q_size + 2 * kv_size != out_features:
        return None
    return [
        FusedSlice("q", 0, q_size),
        FusedSlice("k", q_size, q_size + kv_size),
        FusedSlice("v", q_size + kv_size, out_features),
    ]


class ModelMap:
    """The resolved structure of one model: every module with its roles and layer."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.entries: dict[str, _Entry] = {
            path: _Entry(path, module) for path, module in model.named_modules()
        }
        self.slices: list[Target] = []
        self.stacks: dict[str, int] = {}
        self._resolve()

    # ---- resolution -------------------------------------------------------------------
    def _resolve(self) -> None:
        self.entries[""].roles.add("model")
        self._find_stacks()
        for stack, count in self.stacks.items():
            stack_module = self.entries[stack].module
            for index, (name, _) in enumerate(stack_module.named_children()):
                layer_path = _join(stack, name)
                ref = LayerRef(stack, index, count)
                for path in self._subtree(layer_path):
                    self.entries[path].layer = ref
                self.entries[layer_path].roles.add("layer")
                self._resolve_layer(layer_path)
        self._resolve_outside_layers()
        for entry in self.entries.values():
            if _is_norm(entry.module):
                entry.roles.add("norm")

    def _subtree(self, path: str) -> list[str]:
        prefix = path + "." if path else ""
        return [p for p in self.entries if p == path or p.startswith(prefix)]

    def _find_stacks(self) -> None:
        for path, entry in self.entries.items():
            module = entry.module
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            if len({type(child) for child in module}) != 1:
                continue
            if any(path.startswith(stack + ".") for stack in self.stacks):
                continue
            first = _join(path, "0")
            if any(_is_attention(self.entries[p].module) for p in self._subtree(first)):
                self.stacks[path] = len(module)

    def _resolve_layer(self, layer_path: str) -> None:
        claimed: set[str] = set()  # modules that belong to attention, not to the MLP
        for path in self._subtree(layer_path):
            entry = self.entries[path]
            if path == layer_path or not _is_attention(entry.module):
                continue
            if any(path.startswith(c + ".") for c in claimed if self.entries[c].roles & {"attn", "xattn"}):
                continue  # an attention module nested in another one: keep the outer
            parent = self.entries[path.rsplit(".", 1)[0]].module if "." in path else None
            kind = "xattn" if _is_cross(path, entry.module, parent) else "attn"
            entry.roles.add(kind)
            claimed.update(self._subtree(path))
            self._resolve_projections(path, kind, layer_path, claimed)
        self._resolve_mlp(layer_path, claimed)

    def _resolve_projections(self, attn_path: str, kind: str, layer_path: str, claimed: set[str]) -> None:
        attn = self.entries[attn_path].module
        children = _children(attn)
        found: dict[str, str] = {}
        for part, names in _ATTN_NAMES.items():
            for name in children:
                if name in names and hasattr(children[name], "weight"):
                    found[part] = _join(attn_path, name)
                    break
        if not all(p in found for p in "qkv"):
            for name, child in children.items():
                if name in _FUSED_QKV_NAMES:
                    fused_path = _join(attn_path, name)
                    parts = _fused_slices(child, attn)
                    if parts is None:
                        continue
                    entry = self.entries[fused_path]
                    entry.roles.add(f"{kind}.qkv")
                    for piece in parts:
                        self.slices.append(
                            Target(
                                fused_path,
                                child,
                                frozenset({f"{kind}.{piece.part}"}),
                                entry.layer,
                                piece,
                                attn_path,
                            )
                        )
        if "o" not in found:
            # BERT/RoBERTa/old ViT keep the output projection beside the attention module:
            # layer.attention.{self, output.dense}.
            path = attn_path
            while "." in path and path != layer_path:
                path = path.rsplit(".", 1)[0]
                candidate = _join(path, "output", "dense")
                if candidate in self.entries:
                    found["o"] = candidate
                    claimed.update(self._subtree(_join(path, "output")))
                    break
        for part, path in found.items():
            self.entries[path].roles.add(f"{kind}.{part}")
            self.entries[path].attention_path = attn_path
            claimed.add(path)

    def _resolve_mlp(self, layer_path: str, claimed: set[str]) -> None:
        parts: dict[str, list[str]] = {"up": [], "gate": [], "down": []}
        for path in self._subtree(layer_path):
            if path in claimed or path == layer_path:
                continue
            entry = self.entries[path]
            if not hasattr(entry.module, "weight") or _is_norm(entry.module):
                continue
            name = path.rsplit(".", 1)[-1]
            parent = path.rsplit(".", 1)[0]
            for part, names in _MLP_NAMES.items():
                if name in names:
                    parts[part].append(path)
            # BERT-style: layer.intermediate.dense (up), layer.output.dense (down)
            if name == "dense" and parent == _join(layer_path, "intermediate"):
                parts["up"].append(path)
            if name == "dense" and parent == _join(layer_path, "output"):
                parts["down"].append(path)
        found = [p for paths in parts.values() for p in paths]
        for part, paths in parts.items():
            for path in paths:
                self.entries[path].roles.add(f"mlp.{part}")
        if not parts["up"] or not parts["down"]:
            return
        common = _common_prefix(found)
        if common != layer_path:
            self.entries[common].roles.add("mlp")
            return
        # No single MLP module (BERT: intermediate + output; BART: fc1 + fc2 in the layer):
        # the MLP is the set of the layer's children that hold its projections.
        depth = layer_path.count(".") + 1
        for path in found:
            top = ".".join(path.split(".")[: depth + 1])
            self.entries[top].roles.add("mlp")

    def _resolve_outside_layers(self) -> None:
        inside = {p for p, e in self.entries.items() if e.layer is not None} | set(self.stacks)
        base_prefix = getattr(self.model, "base_model_prefix", "")
        has_base = bool(base_prefix) and base_prefix in _children(self.model)
        # head: what sits beside the base model, plus a pooler inside it
        head_roots: list[str] = []
        if has_base:
            head_roots += [n for n in _children(self.model) if n != base_prefix]
        for path in self.entries:
            if path.rsplit(".", 1)[-1] in _HEAD_NAMES_IN_BASE and path not in inside:
                head_roots.append(path)
        for root in head_roots:
            if any(True for _ in self.entries[root].module.parameters()):
                self.entries[root].roles.add("head")
        heads = set()
        for root in head_roots:
            heads.update(self._subtree(root))
        # embed: top-most modules outside the layers whose class is an embedding
        embeds: list[str] = []
        for path, entry in self.entries.items():
            if path in inside or path in heads or not path:
                continue
            if "Embedding" not in type(entry.module).__name__:
                continue
            if not any(True for _ in entry.module.parameters()):
                continue  # rotary tables hold no parameters
            if any(path.startswith(e + ".") for e in embeds):
                continue
            embeds.append(path)
        for path in embeds:
            self.entries[path].roles.add("embed")

    # ---- queries ----------------------------------------------------------------------
    def targets(self) -> list[Target]:
        """Every module as a target, then the fused-projection slices."""
        out = [
            Target(e.path, e.module, frozenset(e.roles), e.layer, None, e.attention_path)
            for e in self.entries.values()
        ]
        return out + self.slices

    def role_table(self) -> dict[str, list[str]]:
        table: dict[str, list[str]] = {role: [] for role in ROLE_NAMES}
        for target in self.targets():
            for role in target.roles:
                table.setdefault(role, []).append(target.display)
        return table

    def layer_of(self, path: str) -> LayerRef | None:
        entry = self.entries.get(path)
        return entry.layer if entry else None

    def _roles_for(self, target: Target, inherited: bool) -> frozenset[str]:
        if not inherited or target.fused is not None:
            return target.roles
        roles = set(target.roles)
        for path in _ancestors(target.path):
            roles |= self.entries[path].roles
        roles.discard("model")  # "inside the model" would select everything
        if target.path == "":
            roles.add("model")
        return frozenset(roles)

    def select(self, selector) -> list[Target]:
        """Targets matching every key of `selector` (a `recipe.Selector`)."""
        wanted_roles = selector.role_set()
        regex = re.compile(selector.regex) if selector.regex else None
        # With path/regex/type beside it, `role` means "inside a module with that role":
        # {role: attn, type: Linear} is every Linear of the attention modules. Alone, it means
        # the module that has the role.
        narrowing = any(v is not None for v in (selector.path, selector.regex, selector.type))
        out: list[Target] = []
        for target in self.targets():
            if target.fused is not None and not (wanted_roles and target.roles & wanted_roles):
                continue  # slices exist only for role selectors that name them
            if selector.path is not None and not fnmatch.fnmatchcase(target.path, selector.path):
                continue
            if regex is not None and not regex.fullmatch(target.path):
                continue
            if selector.type is not None and selector.type not in {
                cls.__name__ for cls in type(target.module).__mro__
            }:
                continue
            if wanted_roles and not (self._roles_for(target, narrowing) & wanted_roles):
                continue
            if selector.layers is not None:
                if target.layer is None:
                    continue
                if target.layer.index not in selector.layer_indices(target.layer.count):
                    continue
            out.append(target)
        return out


def _ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]


def _common_prefix(paths: list[str]) -> str:
    split = [p.split(".") for p in paths]
    common: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)
