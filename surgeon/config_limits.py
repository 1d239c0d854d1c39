"""Bounds on what a config.json asks for, checked before any model is built from it.

Building a model costs time and memory in what its config says, even on the meta device: each
layer is a Python object tree (10^5 layers take minutes), and transformers creates some buffers
for real (position ids: 8 bytes per position, so 10^9 positions is 8 GB). The bounds are far above
any released checkpoint (the deepest have ~130 layers; the longest contexts ~10^7 positions).
Anything else a config gets wrong (negative sizes, heads not dividing the hidden size, a string
where a number belongs) is the model class's to refuse; `surgeon.checkpoint` turns its exception
into one line.
"""

from __future__ import annotations

import re

from .errors import CheckpointError
from .yamlfile import format_path

MAX_LAYERS = 1024
MAX_POSITIONS = 2**24
_LAYERS = re.compile(r"(^|_)layers?$")  # num_hidden_layers, n_layer, encoder_layers, num_decoder_layers
_POSITIONS = {"max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length", "seq_length"}
_MAX_NESTING = 8  # sub-configs (text_config, vision_config, encoder, decoder …) nest a level or two


def check_config_limits(config: dict, path: str) -> None:
    """Raise one CheckpointError for the first layer count or position count above its bound."""
    _walk(config, (), path)


def _walk(node: dict, at: tuple, path: str) -> None:
    if len(at) > _MAX_NESTING:
        raise CheckpointError(f"{path}: {format_path(at)}: nested deeper than {_MAX_NESTING} levels")
    for key, value in node.items():
        where = at + (key,)
        if isinstance(value, dict):
            _walk(value, where, path)
        elif isinstance(value, int) and not isinstance(value, bool):
            if _LAYERS.search(key) and value > MAX_LAYERS:
                raise CheckpointError(
                    f"{path}: {format_path(where)}: {value} layers is more than surgeon builds (at most {MAX_LAYERS})"
                )
            if key in _POSITIONS and value > MAX_POSITIONS:
                raise CheckpointError(
                    f"{path}: {format_path(where)}: {value} positions is more than surgeon builds "
                    f"(at most {MAX_POSITIONS})"
                )
