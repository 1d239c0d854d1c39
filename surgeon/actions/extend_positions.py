"""`extend_positions`: grow a learned absolute position table so longer inputs fit.

```yaml
- do: extend_positions
  select: {role: embed}
  with: {length: 4096}
```
As in the Longformer conversion (Beltagy et al., 2020, §5): the trained table is copied
(tiled) over the new positions, position p getting row p mod (old length) — which, unlike a
random init, keeps the local structure the attention learned (they lost ~0.12 bits/char before
any training). Special rows before the first real position stay as they are: RoBERTa's table
starts at padding_idx + 1 = 2, so its rows 0-1 are kept and rows 2… are tiled. The config
(`max_position_embeddings` / `n_positions`) and the `position_ids` / `token_type_ids`
buffers follow. The result is a pure function of the base weights, so re-applying the recipe
(which is how a diff is loaded) re-creates it exactly.
Supported: BERT-style `position_embeddings`, RoBERTa (offset 2), GPT-2 `wpe`.
"""

from __future__ import annotations

import pydantic
import torch
from torch import nn

from ..errors import SurgeonError
from .base import Action, params_config
from .limits import Length, check_added_elements

_TABLE_NAMES = {"position_embeddings", "wpe"}


class ExtendPositionsParams(pydantic.BaseModel):
    model_config = params_config()
    length: Length = pydantic.Field(description="new maximum sequence length in tokens")


def position_tables(module: nn.Module, path: str) -> list[tuple[str, nn.Embedding]]:
    """Learned position tables in (or equal to) `module`, with their paths."""
    found = []
    for sub, child in module.named_modules():
        full = f"{path}.{sub}" if sub else path
        if isinstance(child, nn.Embedding) and full.rsplit(".", 1)[-1] in _TABLE_NAMES:
            found.append((full, child))
    return found


def position_offset(table: nn.Embedding) -> int:
    # RoBERTa numbers positions from padding_idx + 1 (fairseq); BERT/GPT-2 from 0.
    return 0 if table.padding_idx is None else table.padding_idx + 1


def tiled(weight: torch.Tensor, offset: int, rows: int) -> torch.Tensor:
    """(old, d) -> (rows, d): keep rows [0, offset), tile the trained rows over the rest."""
    trained = weight[offset:]
    reps = -(-(rows - offset) // trained.shape[0])
    body = trained.repeat(reps, 1)[: rows - offset]
    return torch.cat([weight[:offset], body]).clone()


def _lora_rule_on(path: str, table: nn.Embedding, ctx) -> str | None:
    """Which LoRA adapts `table` — from an earlier patch, or an earlier rule of this recipe
    (checked before it is applied) — if any: its low-rank factor has one row per position."""
    from ..lora.host import LoraHost

    if LoraHost.on(table) is not None:
        return "from an earlier recipe"
    for rule, _, targets in ctx.planned:
        if rule.do == "lora" and any(t.path == path for t in targets):
            return f"rule {rule.index + 1}"
    return None


class ExtendPositions(Action):
    name = "extend_positions"
    Params = ExtendPositionsParams
    summary = "tile learned absolute position embeddings out to a longer maximum length"

    def check_rule(self, targets, params, ctx) -> None:
        tables = [t for target in targets for t in position_tables(target.module, target.path)]
        if not tables:
            shown = ", ".join(f"{t.path} ({t.class_name})" for t in targets[:3])
            raise SurgeonError(
                f"extend_positions: no learned absolute position table (position_embeddings / wpe) in "
                f"{shown}; rotary or relative positions need no extension"
            )
        for path, table in tables:
            lora = _lora_rule_on(path, table, ctx)
            if lora:
                raise SurgeonError(
                    f"extend_positions: {path} already has a LoRA adapter ({lora}) sized for its "
                    f"{table.num_embeddings} rows; put the extend_positions rule before the lora rule"
                )
            if params.length <= table.num_embeddings - position_offset(table):
                raise SurgeonError(
                    f"extend_positions: {path} already covers {table.num_embeddings - position_offset(table)} "
                    f"positions; length {params.length} would not extend it"
                )
            check_added_elements(self.name, path, "the new table", (params.length + position_offset(table), table.embedding_dim))

    def apply(self, target, params, ctx) -> None:
        for path, table in position_tables(target.module, target.path):
            offset = position_offset(table)
            old = table.num_embeddings
            rows = params.length + offset
            with torch.no_grad():
                new = tiled(table.weight.detach(), offset, rows)
            ctx.replace_parameter(table, "weight", new)
            table.num_embeddings = rows
            self._grow_buffers(ctx.model, old, rows)
            self._grow_config(ctx.model, params.length, offset)
            ctx.note(f"{path}: positions {old - offset} -> {params.length} (tiled)")

    @staticmethod
    def _grow_buffers(model: nn.Module, old: int, rows: int) -> None:
        """position_ids (1, old) -> arange(rows); token_type_ids (1, old) -> zeros."""
        for module in model.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is None or buf.dim() != 2 or buf.shape[-1] != old:
                    continue
                persistent = name not in module._non_persistent_buffers_set
                if name == "position_ids":
                    new = torch.arange(rows, device=buf.device, dtype=buf.dtype).expand(1, -1)
                elif name == "token_type_ids":
                    new = torch.zeros(1, rows, device=buf.device, dtype=buf.dtype)
                else:
                    continue
                module.register_buffer(name, new, persistent=persistent)

    @staticmethod
    def _grow_config(model: nn.Module, length: int, offset: int) -> None:
        config = model.config
        if hasattr(config, "n_positions"):
            config.n_positions = length
        else:
            config.max_position_embeddings = length + offset
