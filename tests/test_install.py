"""The project as a user installs it: pip builds the wheel from the checkout, a fresh virtual
environment installs it, and from a folder outside the checkout the installed commands run and the
one import name holds the library call.

The fresh environment takes the dependencies from this one (a .pth line naming this interpreter's
site-packages, which Python reads as a path, not as more .pth files, so this environment's editable
install of the project does not come along): installing them again from the registry would cost
minutes and test pip rather than this project.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

TOP_LEVEL = {"attention_compiler", "compiler", "graphs", "runtime"}


def _run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the fresh environment's bin folder, the wheel), the project built from a copy of the
    checkout (pip writes its build folder into the source tree)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*cache", ".hypothesis"
        ),
    )
    wheels = tmp / "wheels"
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(wheels), str(source)],
        tmp,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp
    )
    deps = [*site.getsitepackages(), sysconfig.get_path("purelib")]
    (Path(purelib.stdout.strip()) / "dependencies.pth").write_text("\n".join(dict.fromkeys(deps)))
    done = _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
        + ["--no-index", str(wheel)],
        tmp,
    )
    assert done.returncode == 0, done.stderr
    return venv / "bin", wheel


def test_the_wheel_installs_one_import_name_and_the_three_layers_under_it(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == TOP_LEVEL
    assert (
        "attention_compiler/artifacts/triton_python_model.py" in names
    )  # the Triton backend's file


def test_the_installed_commands_run_from_a_folder_outside_the_checkout(installed, tmp_path):
    bin_folder, _ = installed
    out = tmp_path / "mha"
    compiled = _run(
        [str(bin_folder / "attention-compile"), "--embed-dim", "64", "--num-heads", "4"]
        + ["--check", "--out", str(out), "--quiet"],
        tmp_path,
    )
    assert compiled.returncode == 0, compiled.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["check"]["passed"] and manifest["spec"]["embed_dim"] == 64
    bench = tmp_path / "bench.json"
    timed = _run(
        [str(bin_folder / "attention-bench"), str(out), "--quick", "--lengths", "8"]
        + ["--batches", "1", "--baselines", "sdpa", "--min-seconds", "0.05", "--json", str(bench)],
        tmp_path,
    )
    assert timed.returncode == 0, timed.stderr
    assert {r["backend"] for r in json.loads(bench.read_text())["rows"]} >= {"portable graph"}
    refused = _run([str(bin_folder / "attention-compile"), "--num-heads", "0"], tmp_path)
    assert refused.returncode == 2
    assert (
        refused.stderr.startswith("attention-compile: error: ") and refused.stderr.count("\n") == 1
    )


def test_the_import_name_holds_the_library_call_from_the_installed_files(installed, tmp_path):
    bin_folder, _ = installed
    code = (
        "import attention_compiler as ac, compiler, sys; "
        "print(ac.__file__, compiler.__file__, ac.compile.__module__, "
        "sorted(ac.TARGETS) == sorted(compiler.TARGETS), 'artifacts' in sys.modules, "
        "issubclass(ac.SpecError, ValueError) and ac.SpecError in ac.USER_ERRORS)"
    )
    result = _run([str(bin_folder / "python"), "-c", code], tmp_path)
    assert result.returncode == 0, result.stderr
    package, layer, module, targets, bare, caught = result.stdout.split()
    venv = str(bin_folder.parent)
    assert package.startswith(venv) and layer.startswith(venv)  # not the checkout's files
    assert module == "attention_compiler.artifacts.pipeline"
    assert (targets, bare, caught) == ("True", "False", "True")
