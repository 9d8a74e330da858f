"""Device-correct by construction: every tensor that dsee_scale/ creates names its device.

A factory without `device=` lands on the CPU in a plain process but on the accelerator inside
zero.Init (DeepSpeed patches the factories), so code that works here can mix devices on a GPU.
The few tensors meant to stay on the host say `device="cpu"` with a comment on the line, in the
functions listed below.
"""
import ast
import tokenize
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "dsee_scale"
FACTORIES = {
    "zeros", "ones", "empty", "full", "arange", "tensor", "as_tensor", "randn", "rand", "randint", "randperm",
    "linspace", "logspace", "eye", "empty_strided", "Generator",
}
# (file under dsee_scale/, function): why a tensor there is created on the host on purpose.
ALLOWED_CPU = {
    ("layer.py", "__init__"): "adapters are drawn from a seeded CPU generator, then moved: the same init on every device",
    ("support.py", "_top_directions"): "random probes from the seeded CPU generator: Ω independent of the device",
    ("support.py", "grebsmo_sparse_part"): "the seeded CPU generator for those probes",
    ("support.py", "random_support"): "random Ω from the seeded CPU generator",
    ("checkpoint.py", "_step_like"): "torch's AdamW keeps its step count on the host",
    ("distill.py", "teacher_outputs"): "the teacher's top-k labels are staged to disk from the host",
    ("prune/refit.py", "_write_back"): "the pruned positions, bit-packed by numpy on the host before their broadcast",
    ("packing.py", "position_ids"): "a packed micro-batch's position ids, collated on the host with its other tensors and moved with them",
    ("zero/single_host.py", "_shm_room_everywhere"): "whether /dev/shm has room on every rank, agreed over gloo (CPU ranks only)",
    ("zero/single_host.py", "_shm_nonce"): "a /dev/shm file name, broadcast over gloo (CPU ranks only)",
    ("zero/single_host.py", "share_frozen_weights"): "which weights every rank would share, agreed over gloo (CPU ranks only)",
}


class _Factories(ast.NodeVisitor):
    """Collects (innermost enclosing function or '<module>', line, call) of torch.<factory>(...)."""

    def __init__(self) -> None:
        self.stack, self.found = ["<module>"], []

    def visit_FunctionDef(self, node) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in FACTORIES and isinstance(f.value, ast.Name) and f.value.id == "torch":
            self.found.append((self.stack[-1], node.lineno, node))
        self.generic_visit(node)


def factory_calls(path: Path):
    visitor = _Factories()
    visitor.visit(ast.parse(path.read_text()))
    return visitor.found


def commented_lines(path: Path) -> set[int]:
    with tokenize.open(path) as f:
        return {tok.start[0] for tok in tokenize.generate_tokens(f.readline) if tok.type == tokenize.COMMENT}


def is_cpu(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return node.value == "cpu"
    return isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "device" and any(is_cpu(a) for a in node.args)


def name_of(path: Path) -> str:
    """The file's path under dsee_scale/ (subpackages have their own __init__.py)."""
    return path.relative_to(PACKAGE).as_posix() if path.is_relative_to(PACKAGE) else path.name


def violations(path: Path) -> list[str]:
    comments = commented_lines(path)
    found = []
    for function, lineno, call in factory_calls(path):
        where = f"{name_of(path)}:{lineno} ({function}): torch.{call.func.attr}"
        device = next((k.value for k in call.keywords if k.arg == "device"), None)
        if device is None or (isinstance(device, ast.Constant) and device.value is None):
            found.append(f"{where} without device=")
        elif is_cpu(device):
            if (name_of(path), function) not in ALLOWED_CPU:
                found.append(f"{where} on the CPU outside the allow-list")
            elif lineno not in comments and lineno - 1 not in comments:
                found.append(f"{where} on the CPU without a comment saying why")
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=name_of)
def test_every_tensor_factory_names_its_device(path):
    assert violations(path) == []


def test_the_checker_catches_device_less_factories(tmp_path):
    bad = tmp_path / "prune.py"
    bad.write_text('import torch\nTABLE = torch.arange(4)\n\ndef f(x):\n    a = torch.zeros(3)\n    g = torch.Generator(device=None)\n'
                   '    b = torch.ones(2, device="cpu")  # a comment\n    def inner():\n        return torch.empty(1)\n    return torch.zeros(2, device=x.device)\n')
    assert [v.split(": ", 1)[1] for v in violations(bad)] == [
        "torch.arange without device=", "torch.zeros without device=", "torch.Generator without device=",
        "torch.ones on the CPU outside the allow-list", "torch.empty without device="]
    assert [v.split(" ", 2)[1] for v in violations(bad)] == ["(<module>):", "(f):", "(f):", "(f):", "(inner):"]


def test_allow_list_has_no_stale_entries():
    used = {(name_of(p), f) for p in PACKAGE.rglob("*.py") for f, _, c in factory_calls(p)
            if any(k.arg == "device" and is_cpu(k.value) for k in c.keywords)}
    assert set(ALLOWED_CPU) == used
