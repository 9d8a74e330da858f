"""Optional dependencies, pyproject's extras: imported only where used, so the core installs into an
existing torch + CUDA environment without them; a missing one fails early, naming the extra."""
from __future__ import annotations

import importlib.util

# module -> (the extra that installs it, what needs it)
EXTRAS = {
    "mpi4py": ("mpi", "finding the ranks without a launcher's environment (mpirun, srun or a plain process: DeepSpeed asks MPI; "
                      "deepspeed and torchrun need no MPI)"),
    "compressed_tensors": ("compressed", "--export_format compressed"),
    "lm_eval": ("eval", "--harness (lm-evaluation-harness)"),
    "gguf": ("gguf", "--model gguf:... (transformers reads the GGUF file with it, once, to convert it)"),
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def missing(module: str) -> MissingExtra:
    """The error for `module` missing: what needs it and the extra to install."""
    extra, needed_by = EXTRAS[module]
    return MissingExtra(f"{needed_by} needs {module}, which is not installed: install dsee_scale's {extra!r} extra "
                        f"(pip install -e '.[{extra}]' in its checkout)", name=module)


def require(module: str) -> None:
    """Raise `missing(module)` unless the module can be found (it is not imported)."""
    if importlib.util.find_spec(module) is None:
        raise missing(module)
