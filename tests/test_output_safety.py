"""No user file is ever lost: --out and --triton-repo are claimed before any work, --force replaces only
folders compile.py wrote, the outputs of one run appear together, and a signal leaves nothing behind
(docs/RELIABILITY.md, "Output folders")."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from attention_compiler.artifacts import files, output_folders
from attention_compiler.cli import bench as bench_script  # noqa: E402
from attention_compiler.cli import compile as compile_script  # noqa: E402

C = ["--embed-dim", "16", "--num-heads", "2", "--quiet"]


def _refused(capsys, argv, message):
    assert compile_script.main([*C, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's working folder: a git repository with work in it, as the working directory."""
    root = tmp_path / "project"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "train.py").write_text("print('mine')\n")
    (root / "sub").mkdir()
    monkeypatch.chdir(root / "sub")
    return root


def test_force_never_replaces_the_working_folder_its_parents_or_a_repository(project, capsys):
    before = _tree(project.parent)
    _refused(capsys, ["--out", ".", "--force"], "--out '.' is the working folder")
    _refused(capsys, ["--out", "", "--force"], "--out '' is empty (an unset variable?)")
    _refused(capsys, ["--out", "..", "--force"], "--out '..' is a parent of the working folder")
    _refused(capsys, ["--out", str(project.parent), "--force"], "is a parent of the working folder")
    os.chdir(project.parent)
    _refused(capsys, ["--out", "project", "--force"], "--out 'project' is a git repository")
    _refused(
        capsys,
        ["--out", str(ROOT), "--force"],
        "is a git repository" if (ROOT / ".git").exists() else "this tool's own code",
    )
    assert _tree(project.parent) == before


def test_force_never_replaces_a_file_or_a_folder_compile_py_did_not_write(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    _refused(capsys, ["--out", "notes.txt", "--force"], "--out 'notes.txt' is a file, not a folder")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.onnx").write_text("someone else's")
    _refused(
        capsys,
        ["--out", "theirs", "--force"],
        "was not written by compile.py (it has no readable manifest.json)",
    )
    assert compile_script.main([*C, "--out", "ours"]) == 0
    (tmp_path / "ours" / "keep.txt").write_text("added by the user")
    _refused(
        capsys,
        ["--out", "ours", "--force"],
        "(it holds 'keep.txt', which compile.py did not write)",
    )
    (tmp_path / "ours" / "keep.txt").unlink()
    assert compile_script.main([*C, "--out", "ours", "--force", "--seed", "4"]) == 0
    assert json.loads((tmp_path / "ours" / "manifest.json").read_text())["weights"]["seed"] == 4
    assert (tmp_path / "notes.txt").read_text() == "mine" and (
        theirs / "model.onnx"
    ).read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "ours", "theirs"]


@pytest.mark.parametrize(
    ("out", "repo"), [("D", "D"), ("P/out", "P"), ("D", "D/models"), ("D", "D/..")]
)
def test_the_two_outputs_of_one_run_may_not_overlap(tmp_path, capsys, monkeypatch, out, repo):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    _refused(
        capsys,
        ["--self-attention", "--batch-first", "--out", out, "--triton-repo", repo, "--force"],
        "overlap",
    )
    assert list((tmp_path / "work").iterdir()) == []


def test_an_input_inside_the_folder_force_replaces_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert compile_script.main([*C, "--out", str(out), "--self-attention"]) == 0
    before = (out / "model.onnx").read_bytes()
    assert (
        compile_script.main(
            ["--quiet", "--onnx", str(out / "model.onnx"), "--out", str(out), "--force"]
        )
        == 2
    )
    assert "--onnx '" in capsys.readouterr().err
    _refused(
        capsys,
        ["--out", str(out), "--force", "--weights", str(out / "model.onnx")],
        "lies inside --out",
    )
    assert (out / "model.onnx").read_bytes() == before


def test_a_symlinked_out_is_written_where_it_points(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    os.symlink("empty", "to-empty")
    os.symlink("missing", "to-missing")
    for link, target in (("to-empty", "empty"), ("to-missing", "missing")):
        assert compile_script.main([*C, "--out", link]) == 0
        assert (tmp_path / link).is_symlink() and sorted(
            p.name for p in (tmp_path / target).iterdir()
        ) == ["manifest.json", "model.onnx"]
    assert compile_script.main([*C, "--out", "to-empty", "--force", "--seed", "2"]) == 0
    assert json.loads((tmp_path / "empty" / "manifest.json").read_text())["weights"]["seed"] == 2


def test_long_and_odd_out_names(tmp_path, capsys):
    assert (
        compile_script.main([*C, "--out", str(tmp_path / ("n" * 250))]) == 0
    )  # the staging name must not grow past 255
    _refused(capsys, ["--out", str(tmp_path / ("n" * 300))], "has a name of 300 bytes")
    _refused(capsys, ["--out", str(tmp_path / "caf\udce9")], "holds bytes that are not UTF-8")
    _refused(
        capsys,
        ["--out", str(tmp_path / "a" / "b"), "--triton-repo", str(tmp_path / ("r" * 300))],
        "has a name of 300",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n" * 250]


def test_a_failure_after_the_first_output_is_in_place_puts_both_back(tmp_path, monkeypatch):
    """--out and the Triton model swap in together: when the second swap fails, the first is undone."""
    first, second = tmp_path / "out", tmp_path / "repo" / "m"
    with output_folders.staged_directory(first) as staging:
        files.write_manifest(staging, {"files": {}})
    claims = [
        output_folders.claim(first, force=True),
        output_folders.claim(second, force=False, owner="triton"),
    ]
    real_swap = output_folders._swap_in

    def swap(output, staging):
        if output is claims[1]:
            raise output_folders.ArtifactError("disk gone")
        return real_swap(output, staging)

    monkeypatch.setattr(output_folders, "_swap_in", swap)
    with pytest.raises(output_folders.ArtifactError, match="disk gone"):
        with output_folders.staged(*claims) as (a, b):
            files.write_manifest(a, {"files": {"new": {}}})
    assert json.loads((first / "manifest.json").read_text())["files"] == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "out"
    ]  # no repo folder, no staging, no backup


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_work_leaves_nothing_behind(tmp_path, signum):
    command = [
        sys.executable,
        str(ROOT / "scripts" / "compile.py"),
        *C,
        "--check",
        "--latency",
        "--report",
        "--out",
        str(tmp_path / "deep" / "out"),
    ]
    # the work happens in the artifact's working folder, under TMPDIR: signal once it is there
    work = tmp_path / "tmp"
    work.mkdir()
    env = {**os.environ, "TMPDIR": str(work)}
    run = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 120
    while not list(work.glob("attention-compiler-*/model.onnx")) and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signum)
    _, err = run.communicate(timeout=120)
    assert not list(work.glob("attention-compiler-*"))  # the working folder is gone
    shutil.rmtree(work)
    assert run.returncode == (130 if signum == signal.SIGINT else 128 + signum), err
    assert err.strip().splitlines()[-1] in (
        "compile.py: interrupted; nothing was written",
        "compile.py: stopped by SIGTERM; nothing was written",
    )
    assert list(tmp_path.iterdir()) == []  # nor the folder 'deep' it made


def test_bench_checks_its_json_and_plot_paths_before_the_benchmark(tmp_path, capsys):
    started = time.monotonic()
    for flag, path, message in (
        ("--json", tmp_path, "is a folder or a device, not a file"),
        ("--plot", tmp_path / "no" / "p.png", "lies in a folder that does not exist"),
    ):
        with pytest.raises(SystemExit) as exit_:
            bench_script.main(["--quick", flag, str(path)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert time.monotonic() - started < 5  # refused at once, no benchmark ran


def test_a_file_that_cannot_be_written_leaves_the_old_one_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")
    monkeypatch.setattr(
        os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    )
    with pytest.raises(
        output_folders.ArtifactError, match="cannot write .*No space left on device"
    ):
        output_folders.write_file_atomically(path, b"new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
