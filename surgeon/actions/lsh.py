"""`lsh`: Reformer's locality-sensitive-hashing attention (Kitaev et al. 2020).

Uses the module's own Q and K (hashed with the same random rotations), adds no parameters.
`n_hashes` trades speed for fidelity (more rounds cover more of the true neighbours);
`bucket_size` is the chunk length (each query sees 2 × bucket_size keys per round);
`shared_qk: true` switches to Reformer's tied keys K = Q/‖Q‖, for models trained that way.
Causal modules are refused: bucket membership depends on later tokens.
"""

from __future__ import annotations

import pydantic

from ..attention.targets import check_attention_target
from ..attention.variants_compressed import LSHAttention
from .base import Action, params_config
from .limits import HashRounds, Length, Seed


class LSHParams(pydantic.BaseModel):
    model_config = params_config()

    n_hashes: HashRounds = 4  # hash rounds: more = closer to dense, cost grows linearly
    bucket_size: Length = 64  # chunk length; sequences of ≤ 2 chunks are attended densely
    seed: Seed = 0  # of the random rotations
    shared_qk: bool = False  # Reformer's K = Q/‖Q‖ (changes a pretrained model's attention)


class LSH(Action):
    name = "lsh"
    Params = LSHParams
    summary = "Reformer LSH attention: hash Q and K into buckets, attend within sorted chunks"

    def check(self, target, params, ctx) -> None:
        check_attention_target(
            self.name, target, ctx,
            causal_refused="LSH bucketing depends on later tokens, so it cannot be made exactly causal",
        )  # fmt: skip

    def apply(self, target, params, ctx) -> None:
        variant = LSHAttention(
            params.n_hashes, params.bucket_size, seed=params.seed, shared_qk=params.shared_qk,
            where=target.display,
        )  # fmt: skip
        ctx.attach_attention(target, variant)
