"""The optional dependencies (pyproject's extras `mpi` and `compressed`) are imported only where
used, and a missing one fails with the extra to install: simulated here by a None in sys.modules,
which makes every import of the module fail as if it were not installed."""
import sys

import pytest

from dsee_scale.extras import EXTRAS, MissingExtra


def test_a_compressed_export_without_compressed_tensors_is_refused_before_launch(monkeypatch, tmp_path):
    from dsee_scale.config import train_config_from_argv
    from dsee_scale.export import export_compressed

    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    with pytest.raises(MissingExtra, match=r"--export_format compressed needs compressed_tensors.*'compressed' extra.*\.\[compressed\]"):
        train_config_from_argv(["--export_format", "compressed"])
    with pytest.raises(MissingExtra, match=r"\[compressed\]"):
        export_compressed(tmp_path / "merged", tmp_path / "compressed", "sparse-bitmask", [])


def test_mpi_discovery_without_mpi4py_names_the_mpi_extra(monkeypatch):
    """DeepSpeed's own MPI discovery (what init_distributed runs without a launcher's environment)
    with mpi4py missing: the error names the extra and the launchers that need none."""
    import deepspeed
    from deepspeed.comm import comm

    from dsee_scale.engine import init_distributed

    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **_: comm.mpi_discovery())
    with pytest.raises(MissingExtra, match=r"needs mpi4py.*'mpi' extra.*\.\[mpi\]") as err:
        init_distributed()
    assert "torchrun" in str(err.value) and err.value.name == "mpi4py"


def test_every_extra_module_is_in_an_extra_of_pyproject():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (extra, _) in EXTRAS.items():
        assert any(req.replace("-", "_").startswith(module) for req in extras[extra]), (module, extra, extras[extra])
