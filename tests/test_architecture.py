"""The layers are visible in the folders, and a layer imports only the layers below it."""

import ast
from pathlib import Path

import ferlab

PACKAGE = Path(ferlab.__file__).parent
LAYERS = ["core", "data", "models", "inference", "reporting", "training", "apps"]  # bottom to top


def layer_of(module: str) -> int:
    """The rank of a ferlab module (``ferlab.data.images`` -> 1); the package itself is above every layer."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def ferlab_imports(path: Path) -> list[tuple[str, int]]:
    """Every ``ferlab`` module a file imports, at module level or inside a function, with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ferlab":
            if node.module == "ferlab":  # from ferlab import x: x is a subpackage or a name of the package
                out += [(f"ferlab.{a.name}", node.lineno) for a in node.names]
            else:
                out.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "ferlab"]
    return out


def test_every_module_lives_in_a_layer():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert loose == []
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(LAYERS)


def test_layers_import_only_layers_below():
    climbing = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        own = layer_of(module)
        for target, line in ferlab_imports(path):
            if layer_of(target) > own:
                climbing.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert climbing == []


def test_the_layer_check_sees_a_climbing_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ferlab.apps.cli import main\n")
    assert [layer_of(t) for t, _ in ferlab_imports(bad)] == [LAYERS.index("apps")]
    assert layer_of("ferlab.data.images") < layer_of("ferlab.apps.cli")


def test_inference_never_loads_lightning():
    """serve, predict and ferlab.analyze run without the training stack: nothing they import pulls in Lightning."""
    import subprocess
    import sys

    code = (
        "import sys, ferlab.apps.serve, ferlab.apps.predict, ferlab.apps.api, ferlab.apps.video, ferlab.apps.videos;"
        "print(sorted(m for m in sys.modules if m.startswith(('lightning', 'ferlab.training'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_function_fits_on_a_screen():
    """No function over 80 lines (its def to its last line) or of cyclomatic complexity 20 or more (radon's
    measure): a longer one becomes a sequence of named steps."""
    from radon.complexity import cc_visit

    long, tangled = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
        blocks = list(cc_visit(text))
        for b in blocks:  # methods and closures too, not only the functions at module level
            blocks += [*getattr(b, "methods", []), *getattr(b, "closures", [])]
        tangled += [
            f"{path.relative_to(PACKAGE)}:{b.lineno} {b.name} ({b.complexity})" for b in blocks if b.complexity >= 20
        ]
    assert long == [] and tangled == []
