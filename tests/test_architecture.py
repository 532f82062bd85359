"""The package boundaries: attacks are algorithms only, and the project's imports form no circle."""

import ast
import subprocess
import sys

from tests.conftest import REPO

PACKAGES = (
    "attacks",
    "experiment",
    "callbacks",
    "datamodules",
    "lightning_modules",
    "integrations",
)


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
    }


def runtime_nodes(tree):
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            checking = isinstance(child, ast.If) and ast.unparse(child.test).endswith(
                "TYPE_CHECKING"
            )
            stack.extend(child.orelse if checking else [child])


def imported_names(module: str, path, tree, type_only: bool = False) -> set[str]:
    """Every name an import statement in ``tree`` refers to, relative imports resolved; with
    ``type_only`` also those under ``if TYPE_CHECKING:``."""
    names = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(tree) if type_only else runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(type_only: bool = False) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (deferred imports count too:
    a circle through a function's import is still a circle; with ``type_only`` so do imports
    for annotations only)."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(module, path, ast.parse(path.read_text()), type_only):
            # ``from package import module`` names the module; ``from module import name`` the module
            while name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in modules and name != module and not module.startswith(name + "."):
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if cycle := visit(node):
            return cycle
    return None


def test_the_import_graph_has_no_circle():
    # annotations included: a type-only circle still ties two modules into one
    graph = import_graph(type_only=True)
    # the graph sees the moved harness; an empty graph would pass vacuously
    assert {"experiment.runner", "attacks.ilrg", "experiment.cli"} <= set(graph)
    assert "experiment.runner" in graph["experiment.stages"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_reports_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_attacks_do_not_import_the_harness():
    graph = import_graph()
    harness = {m for m in graph if m.startswith("experiment")}
    for module, targets in graph.items():
        if module.split(".")[0] == "attacks":
            assert not targets & harness, (module, targets & harness)
            outside = {"lightning_modules", "callbacks", "datamodules"}
            assert not {t for t in targets if t.split(".")[0] in outside}, module


def test_import_attacks_pulls_no_lightning_and_no_option_code():
    code = (
        "import sys\n"
        "import attacks, attacks.defenses, attacks.local_update, attacks.reconstruction\n"
        "import attacks.metrics, attacks.image_metrics, attacks.gradients\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pytorch_lightning', 'lightning', 'lightning_modules', 'callbacks', 'datamodules'))\n"
        "loaded += sorted(m for m in sys.modules if m.split('.')[0] == 'experiment')\n"
        "print(' '.join(loaded))\n"
    )
    assert printed_by(code) == ""


def printed_by(code: str) -> str:
    """What ``code`` prints in a fresh interpreter (this test process has imported everything)."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_only_integrations_import_integrations_and_the_core_needs_no_flower():
    graph = import_graph()
    for module, targets in graph.items():
        if module.split(".")[0] != "integrations":
            assert not {t for t in targets if t.startswith("integrations")}, module
    code = (
        "import sys\n"
        "import attacks, experiment.runner, callbacks, integrations.audit\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray'))))\n"
    )
    assert printed_by(code) == ""


def test_a_refused_option_needs_no_heavy_import():
    """The parsers come before the heavy imports, so a refused option is reported at once:
    train.py's loads no torch at all, attack.py's no Lightning and no torchvision."""
    code = (
        "import sys\n"
        "from experiment.train_cli import build_parser\n"
        "build_parser()\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision', 'pytorch_lightning'))))\n"
    )
    assert printed_by(code) == ""
    code = (
        "import sys\n"
        "from experiment.cli import build_parser\n"
        "build_parser()\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torchvision', 'pytorch_lightning', 'lightning_fabric'))))\n"
    )
    assert printed_by(code) == ""


def test_no_arrow_runs_from_the_ground_floor_up_to_the_harness():
    """attacks, datamodules, lightning_modules and callbacks import nothing of experiment/, not
    even for annotations (the user errors live in the ground-floor module user_errors; train.py's
    options in the harness, experiment/train_cli.py)."""
    graph = import_graph(type_only=True)
    checked = 0
    for module, targets in graph.items():
        if module.split(".")[0] in ("attacks", "datamodules", "lightning_modules", "callbacks"):
            checked += 1
            upward = {t for t in targets if t.split(".")[0] == "experiment"}
            assert not upward, (module, upward)
    assert checked > 30  # the graph saw the packages
