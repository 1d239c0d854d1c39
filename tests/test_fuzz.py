"""Fuzzing every file a user hands surgeon, and every action's numeric parameters (issue 19 §3).

The property is the same everywhere: whatever the input, a command either succeeds or exits 2 with
only `surgeon: error:` / `surgeon: warning:` lines on stderr — never a traceback, never another exit
code, and a refused command writes nothing. Inputs are built by hypothesis from valid files (a real
recipe, manifest, shard index, config.json and adapter_config.json of tiny models) by replacing
values at random paths with hostile ones (huge and negative numbers, NaN and infinities, wrong JSON
types, paths outside the directory, YAML syntax). `derandomize=True`: the same examples every run, so
the suite cannot flake; the escapes found this way are kept as named regressions in
test_bad_inputs.py.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import surgeon
from surgeon import registry
from surgeon.checkpoint import INDEX, inspect_checkpoint
from surgeon.cli import cli
from surgeon.errors import SurgeonError

FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# values a careless or hostile user writes where a number, a string or a list belongs
HOSTILE_NUMBERS = st.sampled_from(
    [0, -1, 1, 2, 3, 7, 2**24, 2**24 + 1, 2**31, 2**63, 10**20, -(10**20), 0.5, -0.5, 1e-300, 1e308,
     float("inf"), float("-inf"), float("nan")]
)  # fmt: skip
HOSTILE_STRINGS = st.sampled_from(["", "x", "1", "-1", "nan", "../x", "/etc/passwd", "a\x01b", "é" * 3, "*", "{", "0:"])
JSON_SCALARS = st.one_of(st.none(), st.booleans(), HOSTILE_NUMBERS, st.integers(-(2**70), 2**70), HOSTILE_STRINGS)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(HOSTILE_STRINGS, st.text(max_size=4)), inner, max_size=3)
    ),
    max_leaves=8,
)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_clean(result) -> None:
    """Success, or exit 2 with one-line errors: nothing else escapes."""
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        return
    assert result.exit_code == 2, (result.exit_code, result.output, repr(result.exception))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert lines and all(l.startswith(("surgeon: error: ", "surgeon: warning: ")) for l in lines), result.stderr
    assert any(l.startswith("surgeon: error: ") for l in lines), result.stderr


def paths_of(data, prefix=()):
    """Every (path, value) in a JSON-like value, containers included."""
    yield prefix, data
    if isinstance(data, dict):
        for key, value in data.items():
            yield from paths_of(value, prefix + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from paths_of(value, prefix + (index,))


def replaced(data, path, value):
    """A copy of `data` with the value at `path` replaced (the whole document for path ())."""
    if not path:
        return value
    copy = json.loads(json.dumps(data))
    node = copy
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return copy


@st.composite
def mutations(draw, document, values=JSON_VALUES, rounds=3):
    """`document` with up to `rounds` values at random paths replaced by hostile ones."""
    for _ in range(draw(st.integers(1, rounds))):
        paths = [path for path, _ in paths_of(document)]
        path = draw(st.sampled_from(paths))
        document = replaced(document, path, draw(values))
    return document


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("fuzz") / "bert")
    tiny_model("bert").save_pretrained(directory)
    return directory


def fresh_copy(source, target):
    """`target` as a fresh copy of the directory `source` (hypothesis reuses one tmp_path)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


def fresh(path):
    """`path` with whatever an earlier example left there removed."""
    if path.exists():
        shutil.rmtree(path)
    return path


def write_json(path, data) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle)  # NaN and infinities as JSON's non-standard literals, as Python reads them


# ---- recipes --------------------------------------------------------------------------------
YAML_PIECES = st.sampled_from(
    ["surgeon: 1\n", "rules:\n", "  - do: lora\n", "  - do: sliding_window\n", "    select: {role: attn}\n",
     "    select: {layers: '0:'}\n", "    with: {r: 8}\n", "    with: {window: 1e30}\n", "    with: {k: -3}\n",
     "base: frozen\n", "model: package:no_such_pkg/m\n", "&a ", "*a ", "!!float ", "[", "]", "{", "}", ": ", "- ",
     "\t", "#", "'", '"', "\n", "\x00", "\x07", "~", "? ", "| ", "%YAML 1.1\n", "---\n", "...\n", "0x1F", ".inf"]
)  # fmt: skip


@FUZZ
@given(pieces=st.lists(YAML_PIECES, min_size=1, max_size=14))
def test_any_recipe_text_is_accepted_or_one_line_errors(pieces, bert_dir, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("".join(pieces), encoding="utf-8", errors="surrogatepass")
    try:
        surgeon.load_recipe(str(path))
    except SurgeonError:
        pass
    assert_clean(invoke("report", bert_dir, "-r", str(path)))


def action_params() -> dict[str, list[str]]:
    return {name: list(registry.get(name).action_class.Params.model_fields) for name in registry.names()}


PARAM_VALUES = st.one_of(JSON_SCALARS, st.lists(st.one_of(HOSTILE_NUMBERS, st.integers(-3, 40)), max_size=4))


@st.composite
def recipes_with_hostile_parameters(draw):
    params = action_params()
    action = draw(st.sampled_from(sorted(params)))
    names = params[action]
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names))) if names else []
    with_ = {name: draw(PARAM_VALUES) for name in chosen}
    role = draw(st.sampled_from(["attn", "attn.q", "layer", "model", "mlp.up"]))
    return {"surgeon": 1, "rules": [{"do": action, "select": {"role": role}, "with": with_}]}


@FUZZ
@given(recipe=recipes_with_hostile_parameters())
def test_every_actions_parameters_are_validated_or_one_line_errors(recipe, bert_dir, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML 1.2 (NaN/Infinity aside, which YAML spells .nan/.inf)
    text = path.read_text().replace("NaN", ".nan").replace("-Infinity", "-.inf").replace("Infinity", ".inf")
    path.write_text(text)
    # report and --dry-run build the model on the meta device: a huge size is refused, never allocated
    assert_clean(invoke("report", bert_dir, "-r", str(path), "--seq-len", "64"))
    out = tmp_path / "out"
    assert_clean(invoke("apply", str(path), bert_dir, "--dry-run", "-o", str(out)))
    assert not out.exists()


# ---- config.json ----------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_any_config_json_is_read_or_one_line_errors(data, bert_dir, tmp_path):
    pristine = json.load(open(os.path.join(bert_dir, "config.json")))
    model_dir = tmp_path / "m"
    model_dir.mkdir(exist_ok=True)
    write_json(model_dir / "config.json", data.draw(mutations(pristine)))
    assert_clean(invoke("report", str(model_dir)))
    assert_clean(invoke("roles", str(model_dir)))


# ---- manifest.json --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_diff(bert_dir, tmp_path_factory):
    model, _ = surgeon.load_model(bert_dir)
    surgeon.patch(model, {"surgeon": 1, "rules": [{"do": "lora", "select": {"role": "attn.q"}, "with": {"r": 2}}]})
    out = str(tmp_path_factory.mktemp("fuzz") / "diff")
    surgeon.save_diff(model, out, base_dir=bert_dir)
    return out


@FUZZ
@given(data=st.data())
def test_any_manifest_is_loaded_or_one_line_errors(data, lora_diff, bert_dir, tmp_path):
    diff = fresh_copy(lora_diff, tmp_path / "diff")
    pristine = json.load(open(diff / "manifest.json"))
    write_json(diff / "manifest.json", data.draw(mutations(pristine)))
    assert_clean(invoke("verify", str(diff), "--base", bert_dir))
    out = fresh(tmp_path / "export")
    result = invoke("export", str(diff), "-o", str(out), "--base", bert_dir, "--no-progress")
    assert_clean(result)
    assert result.exit_code == 0 or not out.exists()


# ---- shard index ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("fuzz") / "llama")
    tiny_model("llama").save_pretrained(directory, max_shard_size="20KB")
    return directory


SHARD_NAMES = st.one_of(
    HOSTILE_STRINGS,
    st.sampled_from(["model-00001-of-00009.safetensors", "../model.safetensors", "/tmp/x.safetensors",
                     "sub/../model-00002-of-00009.safetensors", "model.safetensors\x00", "."]),
)  # fmt: skip


@FUZZ
@given(data=st.data())
def test_any_shard_index_is_read_or_refused_and_nothing_outside_is_touched(data, sharded_llama, tmp_path):
    base = fresh_copy(sharded_llama, tmp_path / "base")
    before = {name: os.path.getsize(base / name) for name in os.listdir(base)}
    index = json.load(open(base / INDEX))
    values = data.draw(st.sampled_from(["names", "anything"]))
    mutated = data.draw(mutations(index, SHARD_NAMES if values == "names" else JSON_VALUES))
    write_json(base / INDEX, mutated)
    try:
        inspect_checkpoint(str(base))
    except SurgeonError:
        pass
    recipe = tmp_path / "bitfit.yaml"
    recipe.write_text("surgeon: 1\nrules:\n  - do: bitfit\n    select: {role: model}\n")
    out = fresh(tmp_path / "out")
    result = invoke("apply", str(recipe), str(base), "-o", str(out))
    assert_clean(result)
    assert result.exit_code == 0 or not out.exists()
    after = {name: os.path.getsize(base / name) for name in os.listdir(base) if name != INDEX}
    assert after == {k: v for k, v in before.items() if k != INDEX}  # no input shard truncated or added


# ---- adapter_config.json --------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_dir(lora_diff, tmp_path_factory):
    from surgeon.peft_io import export_peft

    out = str(tmp_path_factory.mktemp("fuzz") / "peft")
    export_peft(lora_diff, out)
    return out


@FUZZ
@given(data=st.data())
def test_any_adapter_config_is_imported_or_one_line_errors(data, peft_dir, bert_dir, tmp_path):
    adapter = fresh_copy(peft_dir, tmp_path / "peft")
    pristine = json.load(open(adapter / "adapter_config.json"))
    write_json(adapter / "adapter_config.json", data.draw(mutations(pristine)))
    out = fresh(tmp_path / "imported")
    result = invoke("import-peft", str(adapter), "-o", str(out), "--base", bert_dir)
    assert_clean(result)
    assert result.exit_code == 0 or not out.exists()
