"""The layers of the code, checked: every import in services/, streams/ and bench/ (at the top of a
module or inside a function) is read with `ast` and must keep these rules (README, "Layout"):

- the runtime (`services.runtime`) never imports a service, the registry or anything above it;
- the tools (`services.tools`: local brokers, the supervisor, the schema check) stay outside the
  core: neither the runtime nor a service imports them;
- a service package (`services.<name>` for each registered service) imports only the runtime
  and itself: services never reach into each other;
- handlers (`services/<name>/handlers.py`) never import the consumer loop, only the handler
  contract (`services.runtime.handler`);
- the command line (`services.cli`) is the top: nothing imports it;
- the layers have no cycles.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from services import registry

REPO = Path(__file__).resolve().parents[2]
SERVICE_PACKAGES = {s.name for s in registry.SERVICES if (REPO / "services" / s.name).is_dir()}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for top in ("services", "streams", "bench") for p in (REPO / top).rglob("*.py")
            if "migrations" not in p.parts or p.parent.name == "migrations" and p.name == "env.py"}


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from services import registry`
    return {name for name in found if name.split(".")[0] in ("services", "streams", "bench")}


def layer(module: str) -> str | None:
    """The unit a module belongs to: runtime, service:<name>, registry, tools, pipeline, ops, cli, streams, bench."""
    parts = module.split(".")
    if parts[0] in ("streams", "bench"):
        return parts[0]
    if len(parts) < 2:
        return None  # the `services` namespace package itself
    if parts[1] in SERVICE_PACKAGES:
        return f"service:{parts[1]}"
    return parts[1] if parts[1] in ("runtime", "registry", "tools", "pipeline", "ops", "cli") else None


def dependencies() -> dict[str, set[tuple[str, str]]]:
    """module -> (imported project module, its layer), for every import of a project module."""
    known = project_modules()
    out: dict[str, set[tuple[str, str]]] = {}
    for module, path in known.items():
        targets = {name for name in imports_of(path) if name in known}
        out[module] = {(t, layer(t)) for t in targets if layer(t) is not None}
    return out


DEPENDENCIES = dependencies()


def test_the_rules_see_every_layer():
    seen = {layer(m) for m in DEPENDENCIES} - {None}
    assert {"runtime", "registry", "tools", "pipeline", "ops", "cli", "streams", "bench"} <= seen
    assert {f"service:{name}" for name in ("orders", "inventory", "email", "invoice", "analytics")} <= seen
    # the parser finds what is there: the loop imports the handler contract
    assert ("services.runtime.handler", "runtime") in DEPENDENCIES["services.runtime.consumer"]


def test_the_runtime_never_imports_a_service_or_anything_above_it():
    wrong = {(m, t) for m, deps in DEPENDENCIES.items() if layer(m) == "runtime"
             for t, target_layer in deps if target_layer != "runtime"}
    assert not wrong, f"the runtime imports from above it: {sorted(wrong)}"


def test_a_service_imports_only_the_runtime_and_itself():
    wrong = {(m, t) for m, deps in DEPENDENCIES.items() if (own := layer(m) or "").startswith("service:")
             for t, target_layer in deps if target_layer not in ("runtime", own)}
    assert not wrong, f"services reach outside their package: {sorted(wrong)}"


def test_the_tools_stay_outside_the_core():
    wrong = {(m, t) for m, deps in DEPENDENCIES.items()
             if layer(m) == "runtime" or (layer(m) or "").startswith("service:")
             for t, target_layer in deps if target_layer == "tools"}
    assert not wrong, f"the core imports a tool: {sorted(wrong)}"


def test_handlers_use_the_handler_contract_never_the_loop():
    handlers = [m for m in DEPENDENCIES if m.endswith(".handlers") and (layer(m) or "").startswith("service:")]
    assert len(handlers) >= 4
    wrong = {m for m in handlers if any(t == "services.runtime.consumer" for t, _ in DEPENDENCIES[m])}
    assert not wrong, f"handlers import the consumer loop: {sorted(wrong)}"


def test_nothing_imports_the_command_line():
    wrong = {(m, t) for m, deps in DEPENDENCIES.items() if layer(m) != "cli"
             for t, target_layer in deps if target_layer == "cli"}
    assert not wrong, f"the command line is the top layer, yet imported by: {sorted(wrong)}"


def test_the_layers_have_no_cycles():
    graph: dict[str, set[str]] = defaultdict(set)
    for module, deps in DEPENDENCIES.items():
        for _, target_layer in deps:
            if layer(module) not in (None, target_layer):
                graph[layer(module)].add(target_layer)

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return [*path, nxt]
            if nxt not in path and (found := cycle_from(start, [*path, nxt])):
                return found
        return None

    cycles = [c for unit in sorted(graph) if (c := cycle_from(unit, [unit]))]
    assert not cycles, f"layers import each other in a circle: {' -> '.join(cycles[0])}"
