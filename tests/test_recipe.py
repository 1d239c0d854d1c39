"""Recipe validation: every error at once, each with file:line and field path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import surgeon
from surgeon.errors import RecipeError


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


def problems(tmp_path, text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        surgeon.load_recipe(write(tmp_path, text))
    return info.value.problems


def test_valid_recipe_parses(tmp_path):
    recipe = surgeon.load_recipe(write(tmp_path, """
        surgeon: 1
        base: trainable
        rules:
          - do: freeze
            select: {role: layer, layers: ":2"}
          - do: bitfit
            select: {role: [attn, mlp], layers: [0, -1]}
            on_empty: warn
    """))
    assert recipe.base == "trainable"
    assert [r.do for r in recipe.rules] == ["freeze", "bitfit"]
    assert recipe.rules[0].line == 4 and recipe.rules[1].line == 6
    assert recipe.rules[0].select.layer_indices(6) == {0, 1}
    assert recipe.rules[1].select.layer_indices(6) == {0, 5}
    assert recipe.rules[1].on_empty == "warn"


def test_all_errors_reported_at_once_with_lines(tmp_path):
    found = problems(tmp_path, """
        surgeon: 1
        bsae: frozen
        rules:
          - do: bitfti
            select: {role: attn}
          - do: freeze
            select: {rol: attn}
          - do: unfreeze
            select: {role: atn}
          - do: freeze
            select: {layers: "1:x"}
    """)
    text = "\n".join(found)
    assert len(found) == 5, text
    assert "recipe.yaml:2: bsae: unknown key 'bsae' (did you mean 'base'?)" in text
    assert "recipe.yaml:4: rules[0].do: unknown action 'bitfti' (did you mean 'bitfit'?)" in text
    assert "recipe.yaml:7: rules[1].select.rol: unknown key 'rol' (did you mean 'role'?)" in text
    assert "recipe.yaml:9: rules[2].select.role: unknown role 'atn' (did you mean 'attn'?)" in text
    assert "recipe.yaml:11: rules[3].select.layers: bad layer slice '1:x'" in text


def test_duplicate_keys_are_errors(tmp_path):
    found = problems(tmp_path, """
        surgeon: 1
        rules:
          - do: freeze
            select: {role: attn}
            do: unfreeze
    """)
    assert found == ["%s:5: rules[0].do: duplicate key (first given on line 3)" % (tmp_path / "recipe.yaml")]


def test_malformed_yaml_has_line_and_column(tmp_path):
    found = problems(tmp_path, """
        surgeon: 1
        rules:
          - do: freeze
            select: {role: attn
    """)
    assert found == [f"{tmp_path / 'recipe.yaml'}:5:1: malformed YAML: expected ',' or '}}', but got '<stream end>'"]


def test_yaml_1_1_traps_resolved_as_yaml_1_2():
    from surgeon.yamlfile import load_yaml

    data, _ = load_yaml("a: 1e-4\nb: no\nc: 010\nd: 2.5e3\ne: '1e-4'\n", "x")
    assert data == {"a": 1e-4, "b": "no", "c": 10, "d": 2500.0, "e": "1e-4"}
    assert isinstance(data["a"], float)


def test_wrong_types_and_missing_keys(tmp_path):
    found = problems(tmp_path, """
        surgeon: 2
        base: maybe
        rules:
          - select: {role: attn}
          - do: freeze
          - do: freeze
            select: {}
            on_empty: sometimes
    """)
    text = "\n".join(found)
    assert ":1: surgeon:" in text
    assert ":2: base:" in text
    assert "rules[0].do: required key is missing" in text
    assert "rules[1].select: required key is missing" in text
    assert "rules[2].select: a selector needs at least one of" in text
    assert "rules[2].on_empty:" in text


def test_empty_rules_and_non_mapping(tmp_path):
    assert "rules" in "\n".join(problems(tmp_path, "surgeon: 1\nrules: []\n"))
    assert "a recipe is a mapping" in problems(tmp_path, "- just\n- a list\n")[0]


def test_bad_regex(tmp_path):
    found = problems(tmp_path, """
        surgeon: 1
        rules:
          - do: freeze
            select: {regex: "encoder.(layer"}
    """)
    assert "rules[0].select.regex: invalid regular expression" in found[0]


def test_action_params_validated_strictly():
    # freeze takes no parameters: an unknown key under `with:` is an error naming it
    with pytest.raises(RecipeError) as info:
        surgeon.load_recipe({"surgeon": 1, "rules": [{"do": "freeze", "select": {"role": "attn"}, "with": {"r": 8}}]})
    assert "rules[0].with.r: unknown key 'r'" in str(info.value)


def test_layer_slices():
    from surgeon.recipe import Selector

    assert Selector(layers="2:").layer_indices(6) == {2, 3, 4, 5}
    assert Selector(layers="-2:").layer_indices(6) == {4, 5}
    assert Selector(layers="::2").layer_indices(6) == {0, 2, 4}
    assert Selector(layers=3).layer_indices(6) == {3}
    assert Selector(layers=[0, -1, 9]).layer_indices(6) == {0, 5}
    with pytest.raises(Exception):
        Selector(layers="::0")


def test_recipe_file_errors(tmp_path):
    with pytest.raises(surgeon.SurgeonError, match="recipe file not found"):
        surgeon.load_recipe(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"surgeon: 1\n# caf\xe9\n")
    with pytest.raises(surgeon.SurgeonError, match="not UTF-8"):
        surgeon.load_recipe(str(bad))


def test_schema_command_prints_json_schema():
    out = subprocess.run([sys.executable, "-m", "surgeon", "schema"], capture_output=True, text=True, check=True)
    schema = json.loads(out.stdout)
    assert set(schema["properties"]) >= {"surgeon", "base", "rules", "model"}
    rule = schema["$defs"]["Rule"]
    assert "bitfit" in rule["properties"]["do"]["enum"]
