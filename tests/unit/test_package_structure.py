"""The package's shape: no import cycle among dsee_scale's modules, DeepSpeed's internals read only
inside dsee_scale/zero/, and the start-up probe that names the DeepSpeed it was written for."""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dsee_scale"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The dsee_scale modules `path` imports anywhere (module level, in functions, under
    TYPE_CHECKING): `from dsee_scale import x` names the module dsee_scale.x where there is one."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module for alias in node.names}
    return {name for name in found if name in modules and name != "dsee_scale"}  # the top package's facade re-exports only


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as the modules along it, or None (depth-first, three colours)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_dsee_scale_modules():
    graph = import_graph()
    assert {"dsee_scale.trainer", "dsee_scale.zero.shards", "dsee_scale.zero"} <= set(graph)
    assert "dsee_scale.zero.shards" in graph["dsee_scale.zero.patches"]  # the graph sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_deepspeed_internals_are_read_only_inside_zero():
    """`grep -rl "deepspeed.runtime\\|ds_tensor\\|ds_status" dsee_scale` lists dsee_scale/zero/ alone."""
    pattern = re.compile(r"deepspeed\.runtime|ds_tensor|ds_status")
    readers = sorted(str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text()))
    assert readers and all(r.startswith("dsee_scale/zero/") for r in readers), readers


def test_deepspeed_probe_names_the_version_it_was_written_for(monkeypatch):
    from deepspeed.runtime.zero import stage3

    from dsee_scale.zero import compat

    assert compat.missing_internals() == []
    compat.check_deepspeed()  # the installed DeepSpeed has everything
    monkeypatch.delattr(stage3.DeepSpeedZeroOptimizer_Stage3, "_post_step")
    with pytest.raises(RuntimeError, match=rf"DeepSpeedZeroOptimizer_Stage3\._post_step.*written for deepspeed {re.escape(compat.WRITTEN_FOR)}"):
        compat.check_deepspeed()


def test_pyproject_and_constraints_agree_with_the_deepspeed_it_was_written_for():
    """constraints.txt pins compat.WRITTEN_FOR, and pyproject's range starts there (a pip install
    without the pins gets a DeepSpeed whose internals the probe accepts)."""
    import tomllib

    from packaging.requirements import Requirement

    from dsee_scale.zero import compat

    root = PACKAGE.parent
    pin = next(line.strip() for line in (root / "constraints.txt").read_text().splitlines() if line.startswith("deepspeed=="))
    assert pin == f"deepspeed=={compat.WRITTEN_FOR}"
    required = [Requirement(r) for r in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]]
    spec = next(r.specifier for r in required if r.name == "deepspeed")
    assert compat.WRITTEN_FOR in spec and f">={compat.WRITTEN_FOR}" in str(spec).split(","), spec


def test_config_metric_choices_are_the_metrics():
    """The metric field is typed by Literal choices: metrics.METRICS must hold exactly those."""
    import typing

    from dsee_scale import config
    from dsee_scale.metrics import METRICS

    assert set(typing.get_args(config.Metric)) == set(METRICS)
