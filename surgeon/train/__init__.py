"""Training patched models: a validated config, data packing, objectives, the accelerate loop.

    from surgeon.train import TrainConfig, Trainer, train_diff
    result = train_diff("runs/lora", ["corpus.txt"], out_dir="runs/trained", objective="mlm", steps=200)

`config` (TrainConfig, YAML loading) imports no torch; everything else is imported on first use,
so the CLI can build its options from the config without loading torch.
"""

from .config import TrainConfig, load_train_config

_LAZY = {
    "Trainer": "trainer",
    "TrainResult": "trainer",
    "train_diff": "trainer",
    "TrainingInterrupted": "stopping",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainConfig", "TrainResult", "Trainer", "TrainingInterrupted", "load_train_config", "train_diff"]
