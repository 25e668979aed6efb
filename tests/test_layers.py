"""The import structure: no cycles, and no import from the algorithm layer up into the driver
(``docs/architecture.md``). Static: module-level and function-level imports are both counted."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("envs", "networks", "systems", "utils")
DRIVER = {"systems.anakin", "systems.resume", "systems.evaluation", "systems.evaluate", "systems.contract",
          "systems.settings"}
ALGORITHM_PREFIXES = ("systems.ppo", "systems.policy", "systems.stages")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def is_algorithm(module: str) -> bool:
    return module.startswith(ALGORITHM_PREFIXES) or module.endswith("_anakin")


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_driver_imports_nothing_of_the_algorithm_layer():
    graph = imports()
    upward = {(m, t) for m in DRIVER for t in graph.get(m, ()) if is_algorithm(t)}
    assert not upward, f"driver modules import the algorithm layer: {sorted(upward)}"
    assert not any(t.startswith("systems") for m in graph if m.startswith(("networks", "envs", "utils"))
                   for t in graph[m]), "networks/envs/utils must not import systems"


def test_the_algorithm_machinery_imports_only_the_contract_of_the_driver():
    """ppo/policy/stages build Systems from the contract; only the system files' Hydra entries
    (``*_anakin.py``) call the driver."""
    graph = imports()
    allowed = {"systems.contract", "systems.settings"}
    wrong = {(m, t) for m in graph if m.startswith(ALGORITHM_PREFIXES) for t in graph[m]
             if t in DRIVER and t not in allowed}
    assert not wrong, f"algorithm machinery imports the driver: {sorted(wrong)}"
