"""`blockwise`: BlockBERT attention (Qiu et al., 2020) on selected self-attention modules.

```yaml
- do: blockwise
  select: {role: attn}
  with: {block_size: 128, permutations: 2}   # or explicit: [[0, 1, 2, 3], [1, 0, 3, 2]]
                                             # kernel: auto | sdpa | flex (auto: flex on CUDA)
```
Query block i of head group g attends key block π_g(i) only; `permutations: G` splits the
heads into G groups using the cyclic shifts 0 … G-1 (group 0 is the identity, i.e. local
blocks). An input whose length is not a multiple of `block_size` is padded (masked).
Causal modules accept only the identity (`permutations: 1`): attention is causal inside each
token's own block; any other block could lie in the future.
"""

from __future__ import annotations

from typing import Annotated

import pydantic

from ..attention.targets import check_attention_target
from ..attention.variants_local import BlockwiseVariant, heads_of
from ..errors import SurgeonError
from .base import Action, params_config
from .kernel_choice import Kernel, kernel_field
from .limits import MAX_HEAD_GROUPS, HeadGroups, Length


class BlockwiseParams(pydantic.BaseModel):
    model_config = params_config()
    block_size: Length = pydantic.Field(description="tokens per block; cost O(n·block_size)")
    permutations: HeadGroups | Annotated[list[list[int]], pydantic.Field(min_length=1, max_length=MAX_HEAD_GROUPS)] = (
        pydantic.Field(1, description="head groups (cyclic block shifts) or explicit block permutations")
    )
    kernel: Kernel = kernel_field()

    @pydantic.field_validator("permutations")
    @classmethod
    def _permutations(cls, value):
        if isinstance(value, list):
            for perm in value:
                if len(perm) != len(value[0]):
                    raise ValueError(f"the permutations have different lengths ({len(value[0])} and {len(perm)})")
                if sorted(perm) != list(range(len(perm))):
                    shown = perm if len(perm) <= 16 else f"{perm[:16]} …"
                    raise ValueError(f"{shown} is not a permutation of 0 … {len(perm) - 1}")
        return value


class Blockwise(Action):
    name = "blockwise"
    Params = BlockwiseParams
    summary = "BlockBERT blockwise attention (block permutations per head group) in place of dense"

    def check(self, target, params, ctx) -> None:
        check_attention_target(self.name, target, ctx)
        where = f"{target.path} ({target.class_name})"
        groups = params.permutations if isinstance(params.permutations, int) else len(params.permutations)
        heads = heads_of(target.module)
        if heads is not None and heads % groups:
            raise SurgeonError(
                f"blockwise: {groups} permutation head groups do not divide the {heads} heads of {where}"
            )
        identity_only = params.permutations == 1 or (
            isinstance(params.permutations, list)
            and all(p == list(range(len(p))) for p in params.permutations)
        )
        if getattr(target.module, "is_causal", False) and not identity_only:
            raise SurgeonError(
                f"blockwise: {where} is causal; only the identity permutation (permutations: 1) keeps "
                "future tokens hidden"
            )

    def apply(self, target, params, ctx) -> None:
        variant = BlockwiseVariant(block_size=params.block_size, permutations=params.permutations,
                                   kernel=params.kernel)  # fmt: skip
        ctx.attach_attention(target, variant)
