import subprocess
import sys


def test_core_imports_without_torch():
    """Graph building, passes, ONNX Runtime sessions and the NumPy check must not pull in torch."""
    code = (
        "import sys, graphs, compiler, runtime, runtime.ort, runtime.check, runtime.reference; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# in layer order: each package may import the ones before it, never one after it
PACKAGES = ("graphs", "compiler", "runtime", "benchmark", "artifacts", "scripts")
FORBIDDEN = {p: set(PACKAGES[i + 1 :]) for i, p in enumerate(PACKAGES)}


def _imports(path):
    """(line, module, names) of every import in a module, at any depth (inside functions too)."""
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [alias.name for alias in node.names]


def test_layers_import_one_way():
    """graphs imports nothing from compiler, runtime, benchmark, artifacts or scripts; compiler
    nothing from the packages after it, and so on: read with the ast module, every import form, at
    any depth."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for package, forbidden in FORBIDDEN.items():
        for path in (root / package).rglob("*.py"):
            for line, module, _ in _imports(path):
                assert module.split(".")[0] not in forbidden, (
                    f"{package}/{path.name}:{line} imports {module}"
                )


def test_no_module_imports_another_modules_private_names():
    """A name with a leading underscore stays in its module: the packages import none across modules."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            for line, module, names in _imports(path):
                private = [
                    n
                    for n in names
                    if n.startswith("_") and n != "__future__" and module != "__future__"
                ]
                assert not private or module.split(".")[0] not in PACKAGES, (
                    f"{path.name}:{line} imports {private} from {module}"
                )


def test_test_modules_import_optional_packages_only_inside_the_tests_that_need_them():
    """A test module that imported tritonclient, tensorrt or transformers at its top level would fail
    to collect where the package is missing, and one that skipped on it there would skip every
    other test in it along; those imports go through pytest.importorskip, in the test or the helper
    or fixture that needs them."""
    import ast
    from pathlib import Path

    optional = {"tritonclient", "tensorrt", "transformers"}
    for path in (Path(__file__).resolve().parent).glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            skips = [
                call.args[0].value
                for call in ast.walk(node)
                if isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr == "importorskip"
                and call.args
                and isinstance(call.args[0], ast.Constant)
                and not isinstance(node, (ast.FunctionDef, ast.ClassDef))
            ]
            assert not any(n.split(".")[0] in optional for n in names + skips), (
                f"{path.name}:{node.lineno} imports or skips on {names + skips} at collection"
            )
