"""`bitfit`: train only the bias terms (Ben-Zaken et al. 2022, "BitFit").

Only biases that already exist become trainable; none are added. A parameter counts as a bias
if its own name is `bias` (nn.Linear, Conv1D, LayerNorm) — LayerNorm biases included, as in
the paper's BERT experiments. Selected modules without biases are skipped; a rule whose whole
selection has none (e.g. a bias-free Llama) is an error.
"""

from __future__ import annotations

from ..errors import SurgeonError
from .base import Action


def _biases(module):
    return [(n, p) for n, p in module.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]


class BitFit(Action):
    name = "bitfit"
    summary = "make the existing bias parameters of the selected modules trainable"

    def check_rule(self, targets, params, ctx) -> None:
        if not any(_biases(t.module) for t in targets):
            shown = ", ".join(t.display for t in targets[:3])
            raise SurgeonError(
                f"bitfit: none of the {len(targets)} selected modules ({shown}"
                f"{', …' if len(targets) > 3 else ''}) has a bias parameter"
            )

    def apply(self, target, params, ctx) -> None:
        for _, param in _biases(target.module):
            ctx.set_trainable(param, True)
