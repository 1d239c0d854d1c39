"""What surgeon guarantees about files (surgeon.fsutil), tested with real processes and crashes.

- no input is ever inside, equal to or containing an output or a path the command deletes;
- `--force` replaces only an empty directory or one surgeon wrote that holds nothing else;
- a replacement is one step (RENAME_EXCHANGE) or, without renameat2, recovers after a crash;
- two runs racing for one fresh output cannot both succeed;
- temp dirs of killed runs are removed by the next run, a live run's never.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from surgeon import fs_owner, fs_rename, fsutil
from surgeon.errors import SurgeonError
from surgeon.fs_marker import MARKER, write_marker

HAS_RENAMEAT2 = fs_rename._renameat2 is not None


@pytest.fixture(params=["exchange", "fallback"])
def rename_mode(request, monkeypatch):
    """Run a test with renameat2 (where this system has it) and with the two-rename fallback."""
    if request.param == "exchange" and not HAS_RENAMEAT2:
        pytest.skip("no renameat2 on this system")
    monkeypatch.setattr(fs_rename, "enabled", request.param == "exchange")
    return request.param


def write(out, content="new", *, overwrite=False, kind="test", inputs=()):
    with fsutil.atomic_dir(str(out), list(inputs), overwrite=overwrite, kind=kind) as tmp:
        Path(tmp, "v").write_text(content)


def leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".tmp-" in n or ".old-" in n)


def read(out) -> str:
    with open(os.path.join(out, "v")) as handle:
        return handle.read()


# ---- inputs are never outputs ------------------------------------------------------------------
@pytest.mark.parametrize("where", ["same", "output inside input", "input inside output", "input file inside output"])
def test_inputs_and_outputs_never_overlap(tmp_path, where):
    model = tmp_path / "proj" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    data = tmp_path / "proj" / "corpus.txt"
    data.write_text("text")
    source, out = {
        "same": (model, model),
        "output inside input": (model, model / "out"),
        "input inside output": (model, tmp_path / "proj"),
        "input file inside output": (data, tmp_path / "proj"),
    }[where]
    with pytest.raises(SurgeonError, match="input"):
        fsutil.check_paths(inputs=[str(source)], outputs=[str(out)], overwrite=True)
    with pytest.raises(SurgeonError, match="input"):
        write(out, overwrite=True, inputs=[str(source)])
    assert (model / "config.json").read_text() == "{}" and data.read_text() == "text"
    assert leftovers(tmp_path) == leftovers(tmp_path / "proj") == []


def test_links_are_resolved(tmp_path):
    """An input reached through a symlink still counts as the directory it points into."""
    out = tmp_path / "out"
    write(out)
    (out / "notes").mkdir()
    link = tmp_path / "link"
    os.symlink(str(out / "notes"), str(link))
    with pytest.raises(SurgeonError, match="contains the input"):
        fsutil.check_paths(inputs=[str(link)], outputs=[str(out)], overwrite=True)
    os.symlink(str(out), str(tmp_path / "out-link"))
    with pytest.raises(SurgeonError, match="symbolic link"):
        fsutil.check_paths(outputs=[str(tmp_path / "out-link")], overwrite=True)


def test_deletes_are_checked_like_outputs(tmp_path):
    ckpts = tmp_path / "run.checkpoints"
    ckpts.mkdir()
    (ckpts / "base.safetensors").write_text("weights")
    with pytest.raises(SurgeonError, match="would delete .* not written by surgeon"):
        fsutil.check_paths(outputs=[str(tmp_path / "run")], deletes=[str(ckpts)])
    with pytest.raises(SurgeonError, match=r"\(deleted by this run\) contains the input .*base.safetensors"):
        fsutil.check_paths(inputs=[str(ckpts / "base.safetensors")], deletes=[str(ckpts)])
    with pytest.raises(SurgeonError, match=r"\(deleted by this run\) is the same as or inside the input"):
        fsutil.check_paths(inputs=[str(tmp_path)], deletes=[str(ckpts)])
    write_marker(str(ckpts), "train-checkpoints", whole_tree=True)
    fsutil.check_paths(outputs=[str(tmp_path / "run")], deletes=[str(ckpts)])
    fsutil.remove_output(str(ckpts))
    assert not ckpts.exists() and leftovers(tmp_path) == []


def test_remove_output_refuses_what_surgeon_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    with pytest.raises(SurgeonError, match="refusing to delete .* not written by surgeon"):
        fsutil.remove_output(str(mine))
    assert (mine / "precious.txt").read_text() == "keep"


# ---- --force replaces only what surgeon wrote --------------------------------------------------
def test_force_refuses_a_directory_surgeon_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(SurgeonError, match="not written by surgeon.*remove it yourself"):
            write(out, overwrite=overwrite)
    assert os.listdir(out) == ["precious.txt"] and leftovers(tmp_path) == []


def test_force_refuses_a_surgeon_output_holding_other_files(tmp_path, rename_mode):
    out = tmp_path / "out"
    write(out, "old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SurgeonError, match="holds notes.txt, which surgeon did not write"):
        write(out, overwrite=True)
    assert read(out) == "old" and (out / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_force_replaces_a_surgeon_output_and_empty_dirs_need_no_force(tmp_path, rename_mode):
    out = tmp_path / "out"
    out.mkdir()
    write(out, "first")  # an empty directory is replaced without --force
    with pytest.raises(SurgeonError, match="already exists and is not empty .*--force"):
        write(out, "second")
    write(out, "second", overwrite=True)
    assert read(out) == "second" and sorted(os.listdir(out)) == [MARKER, "v"]
    assert json.loads((out / MARKER).read_text())["files"] == ["v"]
    assert leftovers(tmp_path) == []


def test_a_diff_is_recognised_by_its_manifest(tmp_path):
    out = tmp_path / "diff"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "surgeon-diff", "recipes": ["recipe.yaml"]}))
    (out / "diff.safetensors").write_text("")
    (out / "recipe.yaml").write_text("")
    fsutil.check_paths(outputs=[str(out)], overwrite=True)
    (out / "recipe-2.yaml").write_text("")  # not listed in the manifest: the user's
    with pytest.raises(SurgeonError, match="holds recipe-2.yaml"):
        fsutil.check_paths(outputs=[str(out)], overwrite=True)


def test_current_directory_is_never_an_output(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for out in (".", str(empty), str(tmp_path)):
        with pytest.raises(SurgeonError, match="current directory"):
            write(out, overwrite=True)
    assert leftovers(tmp_path) == [] and leftovers(empty) == []


# ---- the CLI: one line, exit 2, the inputs intact ----------------------------------------------
RECIPE = "surgeon: 1\nrules:\n  - do: bitfit\n    select: {role: model}\n"


@pytest.fixture
def cli_project(tmp_path, tiny_model_dir):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "r.yaml").write_text(RECIPE)
    return project, tiny_model_dir("bert")


def _one_line_error(result, *fragments):
    from click.testing import Result

    assert isinstance(result, Result)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("surgeon: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_apply_force_into_the_recipes_folder_is_refused(cli_project, tmp_path):
    from click.testing import CliRunner

    from surgeon.cli import cli

    project, base = cli_project
    result = CliRunner().invoke(cli, ["apply", str(project / "r.yaml"), base, "-o", str(project), "--force"])
    _one_line_error(result, "contains the input", "r.yaml")
    assert os.listdir(project) == ["r.yaml"] and (project / "r.yaml").read_text() == RECIPE
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_cli_apply_to_dot_is_refused(cli_project, tmp_path, monkeypatch, force):
    from click.testing import CliRunner

    from surgeon.cli import cli

    project, base = cli_project
    monkeypatch.chdir(project)
    result = CliRunner().invoke(cli, ["apply", "r.yaml", base, "-o", "."] + (["--force"] if force else []))
    _one_line_error(result, "input")
    assert os.listdir(project) == ["r.yaml"] and leftovers(tmp_path) == []


def test_cli_force_on_someone_elses_directory_is_refused(cli_project, tmp_path):
    from click.testing import CliRunner

    from surgeon.cli import cli

    project, base = cli_project
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["apply", str(project / "r.yaml"), base, "-o", str(out), "--force"])
    _one_line_error(result, "not written by surgeon", "remove it yourself")
    assert os.listdir(out) == ["precious.txt"]
    result = CliRunner().invoke(cli, ["apply", str(project / "r.yaml"), base, "-o", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["apply", str(project / "r.yaml"), base, "-o", str(tmp_path / "d"), "--force"])
    assert result.exit_code == 0, result.output  # a diff surgeon wrote is replaced
    assert leftovers(tmp_path) == []


# ---- one-step replacement, and recovery where it takes two -------------------------------------
@pytest.mark.skipif(not HAS_RENAMEAT2, reason="no renameat2 on this system")
def test_replacement_is_one_exchange(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write(out, "old")
    calls = []
    real = fs_rename.exchange
    monkeypatch.setattr(fs_rename, "exchange", lambda a, b: calls.append((a, b)) or real(a, b))
    monkeypatch.setattr(os, "rename", lambda *a: pytest.fail(f"os.rename{a}: not a single step"))
    write(out, "new", overwrite=True)
    assert read(out) == "new" and len(calls) == 1 and leftovers(tmp_path) == []


def test_output_changed_during_the_run_is_put_back(tmp_path, rename_mode):
    """The check runs before the work; if OUT gains a user's file meanwhile, nothing is replaced."""
    out = tmp_path / "out"
    write(out, "old")
    with pytest.raises(SurgeonError, match="holds precious.txt"), fsutil.atomic_dir(
        str(out), [], overwrite=True, kind="test"
    ) as tmp:
        Path(tmp, "v").write_text("new")
        (out / "precious.txt").write_text("mine")
    assert read(out) == "old" and (out / "precious.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_output_appearing_during_the_run_is_not_replaced_without_force(tmp_path, rename_mode):
    out = tmp_path / "out"
    with pytest.raises(SurgeonError, match="appeared while this run was writing it"), fsutil.atomic_dir(
        str(out), [], kind="test"
    ) as tmp:
        Path(tmp, "v").write_text("mine")
        out.mkdir()
        (out / "v").write_text("theirs")
    assert read(out) == "theirs" and leftovers(tmp_path) == []
    empty = tmp_path / "empty-later"
    with fsutil.atomic_dir(str(empty), [], kind="test") as tmp:
        Path(tmp, "v").write_text("mine")
        empty.mkdir()  # an empty directory appearing meanwhile holds nothing to lose
    assert read(empty) == "mine"


# A writer in its own process; argv: out, mode (exchange|fallback), overwrite (0|1), then what to do:
#   wait FILE  - after writing, wait for FILE to exist before committing (two writers racing)
#   hang       - after writing, sleep until killed (a run killed mid-write)
#   crash-after-exchange / crash-between-renames - SIGKILL itself in the middle of a replacement
WRITER = textwrap.dedent(r"""
    import os, signal, sys, time
    from surgeon import fs_rename, fsutil
    from surgeon.errors import SurgeonError
    out, mode, overwrite, action = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
    fs_rename.enabled = mode == "exchange"
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if action == "crash-after-exchange":
        real_exchange = fs_rename.exchange
        fs_rename.exchange = lambda a, b: real_exchange(a, b) and die()
    if action == "crash-between-renames":
        real_rename = os.rename
        def rename(src, dst):
            real_rename(src, dst)
            if ".old-" in os.path.basename(dst):
                die()
        os.rename = rename
    try:
        with fsutil.atomic_dir(out, [], overwrite=overwrite, kind="test") as tmp:
            open(os.path.join(tmp, "v"), "w").write(str(os.getpid()))
            print("ready", flush=True)
            if action == "wait":
                while not os.path.exists(sys.argv[5]):
                    time.sleep(0.01)
            elif action == "hang":
                time.sleep(600)
    except SurgeonError as exc:
        print(exc, file=sys.stderr)
        sys.exit(3)
""")


def start_writer(out, mode, *args, overwrite=False):
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out), mode, "1" if overwrite else "0", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return proc


def wait_ready(proc) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")


def killed_while_replacing(out, mode: str, action: str) -> None:
    """Write OUT ("old"), then let a writer replacing it with --force SIGKILL itself at `action`."""
    write(out, "old")
    proc = start_writer(out, mode, action, overwrite=True)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.skipif(not HAS_RENAMEAT2, reason="no renameat2 on this system")
def test_killed_right_after_the_exchange_leaves_the_new_output(tmp_path):
    out = tmp_path / "out"
    killed_while_replacing(out, "exchange", "crash-after-exchange")
    assert read(out).isdigit()  # the new output is in place
    assert len(leftovers(tmp_path)) == 1  # the previous one, at the dead run's temp name
    fsutil.check_paths(outputs=[str(out)], overwrite=True)  # the next run to OUT …
    assert leftovers(tmp_path) == []  # … removes it


def test_fallback_killed_between_its_renames_gets_the_previous_output_back(tmp_path):
    out = tmp_path / "out"
    killed_while_replacing(out, "fallback", "crash-between-renames")
    assert not out.exists() and any(".old-" in n for n in leftovers(tmp_path))
    with pytest.raises(SurgeonError, match="already exists"):  # the next run puts it back first
        write(out, "next")
    assert read(out) == "old" and leftovers(tmp_path) == []


# ---- races for one output ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_two_writers_to_one_fresh_output_cannot_both_succeed(tmp_path, mode):
    if mode == "exchange" and not HAS_RENAMEAT2:
        pytest.skip("no renameat2 on this system")
    out, go = tmp_path / "out", tmp_path / "go"
    writers = [start_writer(out, mode, "wait", go) for _ in range(2)]
    for proc in writers:
        wait_ready(proc)  # both checked OUT (absent) and wrote their temp dirs
    go.touch()
    results = [(proc.wait(), proc.stderr.read()) for proc in writers]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 3], results
    loser = next(err for code, err in results if code == 3)
    assert "appeared while this run was writing it" in loser
    winner = writers[[code for code, _ in results].index(0)]
    assert read(out) == str(winner.pid) and leftovers(tmp_path) == []


# ---- temp dirs of killed runs ------------------------------------------------------------------
def test_killed_writers_temp_dir_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    proc = start_writer(out, "exchange" if HAS_RENAMEAT2 else "fallback", "hang")
    wait_ready(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # reaped: the pid is gone
    (stale,) = leftovers(tmp_path)
    assert stale.startswith(".out.tmp-")
    write(out, "next")
    assert read(out) == "next" and leftovers(tmp_path) == []


def test_a_live_writers_temp_dir_is_left_alone(tmp_path):
    out = tmp_path / "out"
    proc = start_writer(out, "exchange" if HAS_RENAMEAT2 else "fallback", "hang")
    try:
        wait_ready(proc)
        (live,) = leftovers(tmp_path)
        write(out, "mine")  # another run to the same OUT, while the first still works
        assert leftovers(tmp_path) == [live] and os.path.isfile(tmp_path / live / "v")
    finally:
        proc.kill()
        proc.wait()
    fsutil.recover(str(out))
    assert leftovers(tmp_path) == []


def test_owner_records(monkeypatch):
    me = fs_owner.token()
    assert not fs_owner.is_gone(me)
    host_boot, pid, start = me.split("-")
    assert not fs_owner.is_gone(f"{'0' * 8}{host_boot[8:]}-{pid}-{start}")  # another host: not ours to judge
    assert fs_owner.is_gone(f"{host_boot[:8]}{'0' * 8}-{pid}-{start}")  # before the last boot
    if start != "0":
        assert fs_owner.is_gone(f"{host_boot}-{pid}-{int(start) + 1}")  # our pid, another process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    deadline = time.time() + 5
    while time.time() < deadline and os.path.exists(f"/proc/{child.pid}"):
        time.sleep(0.05)
    assert fs_owner.is_gone(f"{host_boot}-{child.pid}-{start}")
    assert not fs_owner.is_gone("not-a-token")
