"""The types of a PEFT adapter_config.json, checked before `import-peft` reads a value from it.

PEFT writes these fields with fixed JSON types; a hand-edited file can hold anything, and Python's
truthiness would read `"use_rslora": "no"` as true and `"lora_alpha": "16"` as a string. Only the
fields surgeon reads are typed here (the rest pass through); values PEFT would accept but that
make no adapter (`r: 0`, an infinite or non-positive alpha, a pattern that is not a regular
expression) are refused with the field named.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from .errors import SurgeonError
from .yamlfile import format_path

Alpha = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Rank = Annotated[int, Field(gt=0)]


class PeftLoraConfig(BaseModel):
    """The fields of a PEFT LoraConfig that surgeon reads, with PEFT's defaults."""

    model_config = ConfigDict(extra="allow", strict=True)

    peft_type: str | None = None
    base_model_name_or_path: str | None = None
    r: Rank = 8
    lora_alpha: Alpha = 8
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] | None = 0.0
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, Rank] | None = None
    alpha_pattern: dict[str, Alpha] | None = None

    @pydantic.field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _keys_are_patterns(cls, value: dict | None) -> dict | None:
        for key in value or {}:
            try:
                re.compile(rf"(.*\.)?({key})$")  # how PEFT matches a pattern key against module names
            except re.error as exc:
                raise ValueError(f"key {key!r} is not a regular expression ({exc})") from None
        return value


def validate_peft_config(data: Any, path: str) -> PeftLoraConfig:
    """The validated config; one SurgeonError naming the first field with the wrong type or value."""
    if not isinstance(data, dict):
        raise SurgeonError(f"{path}: not a PEFT adapter config (a JSON {type(data).__name__}, not an object)")
    try:
        return PeftLoraConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        got = repr(error.get("input"))
        shown = got if len(got) <= 60 else got[:57] + "..."
        message = error["msg"].removeprefix("Value error, ")
        raise SurgeonError(f"{path}: {format_path(tuple(error['loc']))}: {message} (got {shown})") from None
