"""Test hook: DeepSpeed's accelerator reports the capabilities of another kind of host.

With this folder on PYTHONPATH and DSEE_SIMULATE_HOST="fp16=0,bf16=1" (either key, 1 or 0), every
Python process (a launcher and all its ranks) sees those answers from is_fp16_supported() and
is_bf16_supported(), so a test run on one CPU exercises what DeepSpeed does on another (an AMD
EPYC without mkldnn fp16 here, an Intel CPU with it there). Nothing in dsee_scale/ reads this.
"""
import importlib.abc
import importlib.machinery
import os
import sys

SPEC = os.environ.get("DSEE_SIMULATE_HOST", "")


def _answers(spec: str) -> dict[str, bool]:
    pairs = [item.split("=") for item in spec.split(",") if item]
    unknown = [k for k, _ in pairs if k not in ("fp16", "bf16")]
    if unknown:
        raise ValueError(f"DSEE_SIMULATE_HOST: unknown keys {unknown}; use fp16=0|1,bf16=0|1")
    return {k: v == "1" for k, v in pairs}


def _patch(module, answers: dict[str, bool]) -> None:
    for cls in vars(module).values():
        if isinstance(cls, type) and hasattr(cls, "is_fp16_supported"):
            for key, value in answers.items():
                setattr(cls, f"is_{key}_supported", lambda self, value=value: value)
            cls.supported_dtypes = lambda self: [d for d, ok in _dtypes(answers) if ok]


def _dtypes(answers):
    import torch

    return [(torch.float, True), (torch.bfloat16, answers.get("bf16", True)), (torch.float16, answers.get("fp16", False))]


class _PatchAccelerators(importlib.abc.MetaPathFinder):
    """Patches each deepspeed.accelerator.<kind>_accelerator module right after it is executed."""

    def __init__(self, answers: dict[str, bool]) -> None:
        self.answers = answers

    def find_spec(self, name, path, target=None):
        if not (name.startswith("deepspeed.accelerator.") and name.endswith("_accelerator")) or name.endswith("real_accelerator"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module, run=run):
            run(module)
            _patch(module, self.answers)

        spec.loader.exec_module = exec_module
        return spec


if SPEC:
    sys.meta_path.insert(0, _PatchAccelerators(_answers(SPEC)))
