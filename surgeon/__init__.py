"""surgeon: recipe-driven surgery on Hugging Face transformers models.

    import surgeon
    recipe = surgeon.load_recipe("recipes:minilm-bitfit")   # a shipped recipe, a YAML path or a dict
    surgery = surgeon.patch(model, recipe)      # in place; returns the record of what changed
    print(surgery.report())
    surgeon.save_diff(model, "runs/minilm")      # only the trainable and added tensors
    model = surgeon.load(base_dir, "runs/minilm")
    surgeon.train_diff("runs/minilm", ["corpus.txt"], out_dir="runs/trained", objective="mlm")
    model = surgeon.load("runs/minilm-export")  # `surgeon export --format surgeon`: no base needed
"""

__version__ = "0.1.0"

from .errors import CheckpointError, RecipeError, SurgeonError  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402


def __getattr__(name):
    # torch-heavy parts are imported on first use so `surgeon schema` and recipe checks stay fast
    if name in ("patch", "Surgery", "surgery_of"):
        from . import engine

        return getattr(engine, name)
    if name == "save_diff":
        from . import diff

        return diff.save_diff
    if name == "load":  # a diff on its base, or a self-contained export
        from .loading import load

        return load
    if name in ("merge", "unmerge"):
        from .lora.merge import merge, unmerge  # `surgeon.lora.merge` the module, not the function

        return {"merge": merge, "unmerge": unmerge}[name]
    if name in ("train_diff", "Trainer", "TrainConfig", "TrainResult", "load_train_config"):
        # `surgeon.train` is the package (importing it binds that name); these are its public parts
        from . import train

        return getattr(train, name)
    if name == "ModelMap":
        from .modelmap import ModelMap

        return ModelMap
    if name in ("load_model", "build_meta_model"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ModelMap",
    "Recipe",
    "RecipeError",
    "Surgery",
    "SurgeonError",
    "build_meta_model",
    "load",
    "load_model",
    "load_recipe",
    "merge",
    "patch",
    "save_diff",
    "surgery_of",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_train_config",
    "train_diff",
    "unmerge",
]
