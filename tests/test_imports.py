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
