import subprocess
import sys


def test_core_imports_without_torch():
    """Graph building, passes, ONNX Runtime sessions and the NumPy check must not pull in torch."""
    code = ("import sys, graphs, compiler, runtime, runtime.ort, runtime.check, runtime.reference; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_layers_import_one_way():
    """graphs imports nothing from compiler or runtime; compiler nothing from runtime."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for package, forbidden in (("graphs", ("compiler", "runtime")), ("compiler", ("runtime",))):
        for path in (root / package).glob("*.py"):
            text = path.read_text()
            for name in forbidden:
                assert f"from {name}" not in text and f"import {name}" not in text, f"{path.name} imports {name}"


def test_test_modules_import_optional_packages_only_inside_the_tests_that_need_them():
    """A test module that imported tritonclient, tensorrt or transformers at its top level would fail
    to collect where the package is missing, taking every other test in it along; those imports go
    through pytest.importorskip, in the test or the helper that needs them."""
    import ast
    from pathlib import Path

    optional = {"tritonclient", "tensorrt", "transformers"}
    for path in (Path(__file__).resolve().parent).glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in optional for n in names), f"{path.name}:{node.lineno} imports {names}"
