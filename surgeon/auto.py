"""`import surgeon.auto`: transformers' Auto classes load `surgeon export --format surgeon` directories.

    import surgeon.auto
    model = transformers.AutoModel.from_pretrained("runs/minilm-export")   # = surgeon.load(...)

It registers a config class for model_type "surgeon" and, for each Auto class, a loader whose
`from_pretrained` returns `surgeon.load(directory)`: the patched model in the class the base was
saved as (AutoModel on a BertForMaskedLM export gives the BertForMaskedLM). This is a separate
import because registering needs transformers (and torch) imported, which `import surgeon`
deliberately avoids (recipe checks and `surgeon schema` stay fast). Hub keyword arguments are
accepted and ignored; the directory must be local. `dtype=` casts the loaded model.
"""

from __future__ import annotations

import transformers

from .export.self_contained import MODEL_TYPE, load_self_contained

_AUTO_CLASSES = (
    "AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification", "AutoModelForQuestionAnswering", "AutoModelForSeq2SeqLM",
)  # fmt: skip


class SurgeonExportConfig(transformers.PretrainedConfig):
    """config.json of a surgeon export: the base config, the recipe, the files' fingerprint."""

    model_type = MODEL_TYPE


class SurgeonExportLoader:
    """What the Auto classes call for a surgeon export: `from_pretrained` is `surgeon.load`."""

    config_class = SurgeonExportConfig

    @classmethod
    def from_pretrained(cls, directory, *args, dtype=None, torch_dtype=None, **kwargs):
        model = load_self_contained(str(directory))
        dtype = dtype if dtype is not None else torch_dtype
        if dtype not in (None, "auto"):
            model = model.to(dtype)
        return model


def register() -> None:
    """Idempotent: registers the config and every Auto class once."""
    if MODEL_TYPE not in transformers.CONFIG_MAPPING:
        transformers.AutoConfig.register(MODEL_TYPE, SurgeonExportConfig)
    for name in _AUTO_CLASSES:
        auto = getattr(transformers, name)
        if SurgeonExportConfig not in auto._model_mapping._extra_content:
            auto.register(SurgeonExportConfig, SurgeonExportLoader)


register()
