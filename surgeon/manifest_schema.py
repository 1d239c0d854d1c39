"""The types of a diff's manifest.json, checked before any field is used.

A hand-edited or damaged manifest is refused with the field path and what is wrong, instead of
failing later on an attribute or key error. Unknown fields are allowed (a newer surgeon may add
some within the same format version); fields added in format 2 are optional, so format 1
manifests still validate.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from .errors import CheckpointError
from .yamlfile import format_path

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


class BaseRecord(_Strict):
    path: str
    model_type: str | None = None
    architectures: list[str] | None = None
    listing_sha256: Sha256 | None = None
    tensors: dict[str, str] = Field(default_factory=dict)
    replaced_sha256: dict[str, Sha256] = Field(default_factory=dict)  # format 1
    tensor_sha256: dict[str, Sha256] | None = None  # format 2, safetensors bases
    file_sha256: dict[str, Sha256] | None = None  # format 2, pickle bases


class TensorRecord(_Strict):
    kind: Literal["added", "trainable"]
    by: str | None = None
    dtype: str
    shape: list[Annotated[int, Field(ge=0)]]
    sha256: Sha256 | None = None  # format 2


class RuleRecord(_Strict):
    do: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")


class Manifest(_Strict):
    format: str
    format_version: Annotated[int, Field(ge=1)] = 1
    surgeon_version: str | None = None
    created: str | None = None
    base: BaseRecord
    recipes: list[str] | None = None
    rules: list[RuleRecord] | None = None
    tensors: dict[str, TensorRecord]
    diff_header_sha256: Sha256 | None = None  # format 2


def validate_manifest(data: Any, path: str) -> None:
    """Raise one CheckpointError naming the first field of `data` that has the wrong type."""
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path}: not a surgeon diff manifest (a JSON {type(data).__name__}, not an object)"
        )
    try:
        Manifest.model_validate(data)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        field = format_path(tuple("with" if part == "with_" else part for part in error["loc"]))
        if error["type"] == "missing":
            raise CheckpointError(f"{path}: {field}: required field is missing") from None
        got = repr(error.get("input"))
        shown = got if len(got) <= 60 else got[:57] + "..."
        raise CheckpointError(f"{path}: {field}: {error['msg']} (got {shown})") from None
