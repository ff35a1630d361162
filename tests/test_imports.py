import subprocess
import sys
from pathlib import Path


def test_core_imports_without_torch():
    """Graph building, passes, ONNX Runtime sessions, the NumPy check and the import name's library
    call must not pull in torch (torch comes in when a torch module is compiled or checked)."""
    code = (
        "import sys, graphs, compiler, runtime, runtime.ort, runtime.check, runtime.reference; "
        "import attention_compiler; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


ROOT = Path(__file__).resolve().parents[1]
# Rooms in layer order: each may import the ones before it, never one after it. The installed
# package's own rooms come after the three layers it is built on; scripts/ and studies/ are
# modules run from a checkout (imported by their bare names).
LAYERS = (
    "graphs",
    "compiler",
    "runtime",
    "attention_compiler.benchmark",
    "attention_compiler.artifacts",
    "attention_compiler",
    "attention_compiler.cli",
    "scripts",
    "studies",
)
FOLDERS = ("graphs", "compiler", "runtime", "attention_compiler", "scripts", "studies")
SCRIPT_MODULES = {
    path.stem: folder for folder in ("scripts", "studies") for path in (ROOT / folder).glob("*.py")
}


def _layer(module: str) -> str | None:
    """The room a dotted module name (or a script's bare name) belongs to; None for other projects."""
    if module in SCRIPT_MODULES:
        return SCRIPT_MODULES[module]
    rooms = [r for r in LAYERS if module == r or module.startswith(r + ".")]
    return max(rooms, key=len) if rooms else None


def _module_name(path: Path) -> str:
    if path.parent.name in ("scripts", "studies"):
        return path.stem
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    for folder in FOLDERS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _imports(path):
    """(line, module, names) of every import in a module, at any depth (inside functions too)."""
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [alias.name for alias in node.names]


def test_layers_import_one_way():
    """graphs imports nothing from compiler, runtime, the package's rooms, scripts or studies;
    compiler nothing from the rooms after it, and so on: read with the ast module, every import form,
    at any depth."""
    for path in _modules():
        own = LAYERS.index(_layer(_module_name(path)))
        for line, module, _ in _imports(path):
            room = _layer(module)
            assert room is None or LAYERS.index(room) <= own, (
                f"{path.relative_to(ROOT)}:{line} imports {module}, a room after its own"
            )


def test_no_two_modules_import_each_other_even_through_others():
    """The modules' imports (any depth) form no cycle: each module can be read after what it uses."""
    names = {_module_name(p): p for p in _modules()}
    uses = {
        name: {m for _, m, _ in _imports(path) if m in names and m != name}
        | {f"{m}.{n}" for _, m, ns in _imports(path) for n in ns if f"{m}.{n}" in names}
        for name, path in names.items()
    }
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, "import cycle: " + " -> ".join([*path[path.index(name) :], name])
        if name not in done:
            for used in sorted(uses[name]):
                visit(used, [*path, name])
            done.add(name)

    for name in sorted(names):
        visit(name, [])


def test_no_module_imports_another_modules_private_names():
    """A name with a leading underscore stays in its module: no module here imports one across
    modules."""
    for path in _modules():
        for line, module, names in _imports(path):
            private = [
                n
                for n in names
                if n.startswith("_") and n != "__future__" and module != "__future__"
            ]
            assert not private or _layer(module) is None, (
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
