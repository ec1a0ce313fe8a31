"""docs/architecture.md is the import map: every module is listed, and no module imports a higher layer."""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"


def documented_layers() -> list[list[str]]:
    """The module names of each layer of the doc's first code block, lowest layer first."""
    block = DOC.read_text().split("```", 2)[1]
    layers: list[list[str]] = []
    pending = ""  # a layer whose names go on to the next line (the first column ends with a comma)
    for line in block.splitlines():
        if not line.strip() or line[0].isspace():
            continue
        names = pending + re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        if names.endswith(","):
            pending = names + " "
            continue
        pending = ""
        layers.append([n.strip() for n in names.split(",") if n.strip()])
    return layers


def documented_late_imports() -> set[tuple[str, str]]:
    return set(re.findall(r"^- `([\w.]+)` -> `([\w.]+)`", DOC.read_text(), flags=re.MULTILINE))


def module_path(module: str) -> pathlib.Path:
    """The file of ``module``, a name relative to ``fleet`` (``stages``, ``bench.scale``; a package: its
    ``__init__``)."""
    base = ROOT / "fleet" / module.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def all_modules() -> list[str]:
    """Every module of the ``fleet`` package but its ``__init__``, as names relative to ``fleet``: ``stages``, and
    for a subpackage its modules as ``bench.scale`` and its ``__init__`` as ``bench``."""
    names = []
    for path in (ROOT / "fleet").rglob("*.py"):
        parts = path.relative_to(ROOT / "fleet").with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if parts:
            names.append(".".join(parts))
    return sorted(names)


def _resolve(dotted: str) -> str:
    """The module that ``fleet.<dotted>`` names: the longest prefix of it that is a module of ``fleet``
    (``bench.scale.run_probe`` -> ``bench.scale``; ``bench.add_arguments`` -> ``bench``)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if (ROOT / "fleet" / name.replace(".", "/")).is_dir() or module_path(name).is_file():
            return name
    return parts[0]


def fleet_imports(module: str) -> tuple[set[str], set[str]]:
    """The fleet modules ``module`` (``stages``, ``bench.scale``) imports at module level, and inside functions."""
    path = module_path(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    in_functions = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(node)
    }
    top, late = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level:  # relative: from the package of this module
            base = ".".join(package.split(".")[: len(package.split(".")) - (node.level - 1)]) if package else ""
            base = ".".join(p for p in (base, node.module or "") if p)
            names = [_resolve(f"{base}.{a.name}" if base else a.name) for a in node.names]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and (node.module == "fleet" or node.module.startswith("fleet."))
        ):
            base = node.module[len("fleet.") :] if node.module != "fleet" else ""
            names = [_resolve(f"{base}.{a.name}" if base else a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            names = [_resolve(a.name[len("fleet.") :]) for a in node.names if a.name.startswith("fleet.")]
        (late if id(node) in in_functions else top).update(n for n in names if n != module)
    return top, late


def test_every_module_is_documented_once():
    modules = all_modules()
    listed = [name for layer in documented_layers() for name in layer]
    assert sorted(listed) == modules, "docs/architecture.md must list each fleet module once"


def test_no_module_imports_a_higher_layer():
    layer_of = {name: i for i, layer in enumerate(documented_layers()) for name in layer}
    allowed_late = documented_late_imports()
    upward = []
    for module, level in layer_of.items():
        top, late = fleet_imports(module)
        upward += [f"{module} -> {dep} (module level)" for dep in sorted(top) if layer_of.get(dep, -1) > level]
        upward += [
            f"{module} -> {dep} (in a function, not listed as a late import)"
            for dep in sorted(late)
            if layer_of.get(dep, -1) > level and (module, dep) not in allowed_late
        ]
    assert not upward, "upward imports against docs/architecture.md:\n" + "\n".join(upward)


def test_listed_late_imports_exist():
    for module, dep in documented_late_imports():
        assert dep in fleet_imports(module)[1], f"{module} -> {dep} is listed as a late import but not made"


def test_each_package_is_one_run_of_layers():
    """The tree shows the layers: a package's modules stand together in the list, no package between them."""
    packages = [name.split(".")[0] for layer in documented_layers() for name in layer]
    runs = [p for i, p in enumerate(packages) if i == 0 or packages[i - 1] != p]
    split = sorted({p for p in runs if runs.count(p) > 1})
    assert not split, f"packages listed in more than one place in docs/architecture.md: {split}"


def test_no_module_left_at_the_top():
    """Every module but the Python API (``fleet/__init__``) lives in a layer's subpackage."""
    flat = [m for m in all_modules() if "." not in m and not (ROOT / "fleet" / m).is_dir()]
    assert not flat, f"modules outside a subpackage: {flat}"
