"""The import rules of docs/design.md ("Who imports whom"), checked on every import in the packages."""
import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("user_errors", "safe_io", "datamodules", "analysis", "models", "contracts", "lightning_modules",
            "evaluation", "training")
SCRIPTS = ("train", "evaluate", "ablate")
BASE = ("user_errors", "safe_io")
ALLOWED = {
    "user_errors": (),
    "safe_io": ("user_errors", "safe_io"),
    "datamodules": (*BASE, "datamodules"),
    "analysis": (*BASE, "analysis"),
    "models": (*BASE, "models"),
    "contracts": (*BASE, "analysis", "datamodules", "models", "contracts"),
    "lightning_modules": (*BASE, "datamodules", "models", "contracts", "lightning_modules"),
    "evaluation": (*BASE, "datamodules", "analysis", "models", "contracts", "lightning_modules", "evaluation"),
    "training": (*BASE, "datamodules", "analysis", "models", "contracts", "lightning_modules", "evaluation",
                 "training"),
}


def project_imports(path: Path) -> set[str]:
    """Modules of the project (or its scripts) that a file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in (*PACKAGES, *SCRIPTS)}


def modules() -> list[tuple[str, Path]]:
    """Every module of the packages, those of their subpackages (training.grid.cells, ...) included."""
    return [(".".join(path.relative_to(REPO).with_suffix("").parts), path) for pkg in PACKAGES
            for path in sorted((REPO / pkg).rglob("*.py"))]


def floor(module: str) -> str:
    return module.split(".")[0]


def test_imports_go_down_the_floors() -> None:
    wrong = {}
    for module, path in modules():
        allowed = ALLOWED[floor(module)]
        bad = sorted(n for n in project_imports(path) if not any(n == a or n.startswith(a + ".") for a in allowed))
        if bad:
            wrong[module] = bad
    assert not wrong, f"imports that go up a floor (docs/design.md, 'Who imports whom'): {wrong}"


def test_rules_cover_every_package_and_find_a_wrong_import(tmp_path: Path) -> None:
    assert {floor(m) for m, _ in modules()} == set(ALLOWED)
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from evaluation.ginc_curves import load_model\n    import train\n")
    assert project_imports(bad) == {"evaluation.ginc_curves.load_model", "train"}
    plotting = tmp_path / "plotting.py"
    plotting.write_text("import matplotlib\nmatplotlib.use('Agg')\n")
    assert sets_plot_state(plotting) and not sets_plot_state(bad)


def test_no_global_plotting_state_at_import() -> None:
    for module, path in modules():
        assert not sets_plot_state(path), f"{module} sets matplotlib's global state (pyplot or a backend)"


def sets_plot_state(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {f"{node.module}.{alias.name}" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module for alias in node.names}
    backend = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "use"
               and isinstance(node.value, ast.Name) and node.value.id == "matplotlib"]
    return "matplotlib.pyplot" in imported or bool(backend)
