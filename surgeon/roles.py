"""The architecture-agnostic role vocabulary: the names a recipe's `role:` may use.

A leaf module (no surgeon imports) so that the tree walker (`modelmap`), which assigns roles,
and the recipe schema (`recipe`), which validates them, both read one list without the walker
depending on the user-facing schema.

- `model`: the whole model; `embed`: embedding tables; `layer`: each block of a layer stack;
- `attn` (self-attention) and its projections `attn.q`/`.k`/`.v`/`.o`, or a fused `attn.qkv`;
- `xattn` …: the same for cross-attention (T5 `EncDecAttention`, BART `encoder_attn`);
- `mlp`, `mlp.up`/`.gate`/`.down`; `norm`: normalisation layers; `head`: beside the base model.
"""

ROLE_NAMES = (
    "model", "embed", "layer", "attn", "attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "xattn",
    "xattn.q", "xattn.k", "xattn.v", "xattn.o", "xattn.qkv", "mlp", "mlp.up", "mlp.gate", "mlp.down",
    "norm", "head",
)  # fmt: skip
