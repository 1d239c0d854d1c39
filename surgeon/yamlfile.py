"""YAML loading that keeps line numbers and avoids YAML 1.1's traps.

PyYAML implements YAML 1.1: `1e-4` loads as a string, `no`/`on` as booleans, `010` as 8, and a
duplicate key silently keeps the last value. Recipes are read with the YAML 1.2 core schema
instead (`true`/`false` only, decimal ints, floats with or without a dot) and duplicate keys are
errors. Every key and list item's line is recorded so validation errors can point at it.

A recipe is plain data, so what plain data never needs is refused with its line, before anything
is built: anchors and aliases (PyYAML expands each alias without sharing, so a few hundred bytes
of nested aliases take minutes and gigabytes, and an alias inside its own anchor recurses),
explicit tags (`!!float abc`, `!!binary`, `!!python/...`), nesting deeper than MAX_DEPTH, and
control characters (which YAML itself forbids).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import pydantic
import yaml

from .errors import RecipeError, SurgeonError

Path = tuple  # a data path: ("rules", 0, "with", "r")


MAX_DEPTH = 32  # a recipe's deepest value (rules[0].with.<list>) is 5 levels down


class _CoreLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalar resolution; no anchors, aliases or tags."""

    def __init__(self, text: str, source: str):
        self.source = source
        self.depth = 0
        super().__init__(text)

    def compose_node(self, parent, index):
        event = self.peek_event()
        mark = event.start_mark
        where = f"{self.source}:{mark.line + 1}:{mark.column + 1}"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise RecipeError([f"{where}: YAML anchors and aliases (&name, *name) are not allowed in a recipe; "
                               "write the value out where it is used"])  # fmt: skip
        if getattr(event, "tag", None) is not None:
            raise RecipeError([f"{where}: YAML tags ({event.tag}) are not allowed in a recipe; "
                               "write the plain value (quote it to make it a string)"])  # fmt: skip
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise RecipeError([f"{where}: nested deeper than {MAX_DEPTH} levels; a recipe needs at most a few"])
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_CoreLoader.yaml_implicit_resolvers = {}
_CoreLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_CoreLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_CoreLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)
_CoreLoader.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)  # "010" is ten, not eight


_CoreLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    return float(text.replace(".inf", "inf").replace(".nan", "nan"))


_CoreLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a value that appears twice in full both times: recipes refuse anchors and aliases."""

    def ignore_aliases(self, data) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    """`data` as YAML that `load_yaml` reads back (keys in order, no anchors or aliases)."""
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False)


def read_yaml_text(path: str, noun: str, limit: int | None = None) -> str:
    """The text of a YAML file a user named; missing, unreadable, non-UTF-8 or (with `limit`)
    oversized files are one-line errors naming the file and what it was meant to be."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read() if limit is None else handle.read(limit)
            if limit is not None and handle.read(1):
                raise SurgeonError(f"{path}: more than {limit} characters; a {noun} is a short file")
    except FileNotFoundError:
        raise SurgeonError(f"{path}: {noun} file not found") from None
    except UnicodeDecodeError as exc:
        raise SurgeonError(f"{path}: {noun} is not UTF-8 text ({exc.reason})") from None
    except IsADirectoryError:
        raise SurgeonError(f"{path}: the {noun} is a directory, not a file") from None
    except OSError as exc:
        raise SurgeonError(f"{path}: cannot read {noun}: {exc.strerror}") from None
    return text


def load_yaml(text: str, source: str) -> tuple[Any, dict[Path, int]]:
    """Parse `text`; return the data and a map from data path to 1-based line number."""
    loader = None
    try:
        loader = _CoreLoader(text, source)  # the reader refuses control characters right here
        node = loader.get_single_node()
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise RecipeError([f"{source}:{line}: control character #x{exc.character:02x} is not allowed in YAML"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([f"{where}: malformed YAML: {problem}"]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        return None, {}
    lines: dict[Path, int] = {(): node.start_mark.line + 1}
    problems: list[str] = []
    data = _build(loader, node, (), lines, problems, source)
    if problems:
        raise RecipeError(problems)
    return data, lines


def _build(loader, node, path: Path, lines, problems, source) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for key_node, value_node in node.value:
            key = _build(loader, key_node, path, {}, problems, source)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                problems.append(f"{source}:{line}: {format_path(path)}: mapping keys must be scalars")
                continue
            if key in out:
                problems.append(
                    f"{source}:{line}: {format_path(path + (key,))}: duplicate key "
                    f"(first given on line {lines[path + (key,)]})"
                )
                continue
            lines[path + (key,)] = line
            out[key] = _build(loader, value_node, path + (key,), lines, problems, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            lines[path + (index,)] = item.start_mark.line + 1
            items.append(_build(loader, item, path + (index,), lines, problems, source))
        return items
    try:
        return loader.construct_object(node, deep=True)
    except (ValueError, yaml.YAMLError) as exc:  # e.g. an integer of more digits than Python converts
        problems.append(f"{source}:{node.start_mark.line + 1}: {format_path(path)}: {str(exc).splitlines()[0]}")
        return None


def format_path(path: Path) -> str:
    """("rules", 0, "with", "r") -> "rules[0].with.r"."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "<top>"


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of the longest prefix of `path` that the file has."""
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _data_prefix(loc: tuple, data: Any) -> Path:
    """The part of a pydantic error location that exists in the data (drops union tags)."""
    out: list = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif part == "with_" and isinstance(node, dict) and "with" in node:
            part, node = "with", node["with"]
        elif isinstance(part, str) and ("[" in part or part[:1].isupper()):
            continue  # a union member's tag ('list[int]', 'WindowGrowth'): the data goes on below it
        else:
            break
        out.append(part)
    return tuple(out)


def _is_type_mismatch(error: dict) -> bool:
    return error["type"].endswith("_type")  # int_type, list_type, model_type, …


def _relevant(errors: list[dict], data: Any) -> list[dict]:
    """A value that fails a union reports every member's error; drop the members whose type it
    does not have when another member that took it says what is wrong inside (window: [4, 0]
    is a bad list entry, not "should be a valid integer")."""
    paths = [_data_prefix(tuple(e["loc"]), data) for e in errors]
    keep = []
    for error, path in zip(errors, paths):
        if _is_type_mismatch(error) and any(
            not _is_type_mismatch(other) and other_path[: len(path)] == path
            for other, other_path in zip(errors, paths)
        ):
            continue
        keep.append(error)
    return keep


# errors whose message does not say what was given
_SHOW_INPUT = ("literal_error", "greater_than", "greater_than_equal", "less_than", "less_than_equal",
               "finite_number", "too_short", "too_long")  # fmt: skip


def validation_problems(
    exc: pydantic.ValidationError, prefix: Path, data: Any, where, fields_at
) -> list[str]:
    """One located line per pydantic error: `where(path): field.path: message`.

    `data` is what was validated (found at `prefix` in the file), `where(path)` names the place a
    data path came from (e.g. `file.yaml:12`), `fields_at(path)` lists the keys known at a path
    (for "did you mean" on unknown keys)."""
    problems, seen = [], set()
    for error in _relevant(exc.errors(), data):
        loc = tuple(error["loc"])
        inside = _data_prefix(loc, data)
        full = prefix + inside
        if error["type"] == "extra_forbidden":
            key = loc[-1]
            known = fields_at(full[:-1] if full and full[-1] == key else full)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            message = f"unknown key '{key}'{hint}" + (f"; known keys: {', '.join(known)}" if known else "")
        elif error["type"] == "missing":
            full = full + (loc[-1],) if loc and loc[-1] not in inside else full
            message = "required key is missing"
        else:
            message = _message(error)
        text = f"{where(full)}: {format_path(full)}: {message}"
        if full in seen and error["type"] not in ("extra_forbidden", "missing"):
            continue  # one line per field: unions report each member otherwise
        seen.add(full)
        problems.append(text)
    return problems


def _message(error: dict) -> str:
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("string_type", "int_type", "float_type", "bool_type", "list_type", "dict_type"):
        got = error.get("input")
        if isinstance(got, str) and error["type"] in ("int_type", "float_type"):
            msg += f" (got the string '{got}'; write numbers unquoted)"
        else:
            msg += f" (got {type(got).__name__} {got!r})"
    elif error["type"] in _SHOW_INPUT and "input" in error:
        msg += f" (got {error['input']!r})"
    return msg
