"""The refusals every efficient-attention action shares, each naming the module."""

from __future__ import annotations

from ..errors import SurgeonError


def check_attention_target(action: str, target, ctx, *, causal_refused: str | None = None) -> None:
    """The common refusals of attention variants, each naming the module. `causal_refused`: the
    reason a bidirectional-only variant gives for refusing causal (decoder) attention."""
    from ..modelmap import routes_through_interface

    where = f"{target.path} ({target.class_name})"
    if "xattn" in target.roles:
        raise SurgeonError(f"{action}: {where} is cross-attention; only self-attention can be converted")
    if "attn" not in target.roles:
        roles = ", ".join(sorted(target.roles)) or "none"
        raise SurgeonError(
            f"{action}: {where} is not a self-attention module (roles: {roles}); select role: attn"
        )
    if not routes_through_interface(target.module):
        raise SurgeonError(
            f"{action}: {where} computes attention in its own eager code, not through transformers' "
            "AttentionInterface; this family is not supported"
        )
    if causal_refused and getattr(target.module, "is_causal", False):
        raise SurgeonError(f"{action}: {target.display} is causal (decoder) attention; {causal_refused}")

