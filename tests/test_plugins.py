"""Actions come from the `surgeon.actions` entry-point group: built-ins and plugins alike."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import tiny_model

import surgeon
from surgeon import registry
from surgeon.errors import SurgeonError

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "surgeon-plugin-example")


def fake_distribution(root, name: str, entry_points: str, module_source: dict[str, str] | None = None) -> None:
    """Make an installed-looking distribution: what pip leaves in site-packages."""
    info = root / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[surgeon.actions]\n" + entry_points)
    for filename, source in (module_source or {}).items():
        (root / filename).write_text(source)


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    def add(name, entry_points, module_source=None):
        fake_distribution(tmp_path, name, entry_points, module_source)
        monkeypatch.syspath_prepend(str(tmp_path))
        registry.reset()

    yield add
    registry.reset()


def test_builtins_come_from_entry_points():
    eps = registry.entry_points()
    for name in ("freeze", "unfreeze", "bitfit"):
        assert eps[name].dist.name == "surgeon"
        assert registry.get(name).origin.startswith("surgeon (surgeon.actions.")


def test_example_plugin_is_discovered_and_works(plugin_path):
    # the example package's own entry point, installed as pip would
    plugin_path("surgeon-plugin-example", "scale_init = surgeon_plugin_example:ScaleInit\n")
    sys.path.insert(0, EXAMPLE)
    try:
        assert "scale_init" in registry.names()
        info = registry.get("scale_init")
        assert info.origin.startswith("surgeon-plugin-example")
        model = tiny_model("bert")
        before = model.pooler.dense.weight.detach().clone()
        surgery = surgeon.patch(model, {"surgeon": 1, "rules": [
            {"do": "scale_init", "select": {"role": "head", "type": "Linear"}, "with": {"factor": 2.0}},
        ]})  # fmt: skip
        assert torch.equal(model.pooler.dense.weight, before * 2)
        assert surgery.ledger.trainable_names() == ["pooler.dense.weight"]
        with pytest.raises(surgeon.RecipeError, match=r"rules\[0\]\.with\.factor"):
            surgeon.load_recipe({"surgeon": 1, "rules": [{"do": "scale_init", "select": {"role": "head"}, "with": {"factor": -1}}]})
    finally:
        sys.path.remove(EXAMPLE)
        sys.modules.pop("surgeon_plugin_example", None)


def test_duplicate_name_names_both_origins(plugin_path):
    plugin_path("other-plugin", "bitfit = other_plugin:BitFit\n")
    with pytest.raises(SurgeonError, match=r"action 'bitfit' is defined twice: by (surgeon \(.*\) and by other-plugin|other-plugin \(.*\) and by surgeon)"):
        registry.names()


def test_broken_plugin_is_reported_not_skipped(plugin_path):
    plugin_path("broken-plugin", "shiny = broken_plugin_mod:Shiny\n", {"broken_plugin_mod.py": "import not_a_module\n"})
    assert "shiny" in registry.names()
    loaded, broken = registry.load_all()
    assert {i.name for i in loaded} >= {"freeze", "bitfit"}
    assert len(broken) == 1 and "broken-plugin" in broken[0] and "ModuleNotFoundError" in broken[0]
    with pytest.raises(surgeon.RecipeError, match="action 'shiny' from broken-plugin .* failed to load"):
        surgeon.load_recipe({"surgeon": 1, "rules": [{"do": "shiny", "select": {"role": "attn"}}]})


def test_plugin_with_wrong_type_or_name(plugin_path):
    plugin_path("bad-plugin", "notaction = bad_mod:Thing\nmisnamed = bad_mod:Misnamed\n", {"bad_mod.py": (
        "from surgeon.actions.base import Action\n"
        "class Thing: pass\n"
        "class Misnamed(Action):\n    name = 'other'\n"
    )})  # fmt: skip
    with pytest.raises(SurgeonError, match="is not a surgeon Action subclass"):
        registry.get("notaction")
    with pytest.raises(SurgeonError, match="declares name 'other'"):
        registry.get("misnamed")
