"""`python -m dsee_scale.doctor`: whether this machine can train, in one report: DeepSpeed's
accelerator and why, the torch build, the GPUs and driver, DeepSpeed (version, compiled ops, the
internals dsee_scale reads), the communication backends, libaio, mpi4py, and the DeepSpeed config
a run would choose. It ends with a verdict and exits 1 on a combination known to fail or to train
on the wrong device, naming the fix; `--json` prints the same for machines.

    python -m dsee_scale.doctor                        # the report
    python -m dsee_scale.doctor --ds_config zero3_bf16  # and whether that config's precision runs here
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import shutil
import sys

from dsee_scale import host
from dsee_scale.ds_config import ConfigError, libaio_ready, load_ds_config


class Report:
    """Facts (name → text), problems (each with its fix: the run would fail or use the wrong
    device) and notes (worth knowing, not blocking)."""

    def __init__(self) -> None:
        self.facts: dict[str, str] = {}
        self.problems: list[str] = []
        self.notes: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.problems

    def verdict(self) -> str:
        if self.problems:
            return f"NOT ready: {len(self.problems)} problem(s) above, each with its fix"
        return f"ready to train on {host.accelerator()}"

    def text(self) -> str:
        width = max(map(len, self.facts))
        lines = [f"{name:<{width}}  {value}" for name, value in self.facts.items()]
        lines += [f"problem: {p}" for p in self.problems] + [f"note: {n}" for n in self.notes]
        return "\n".join([*lines, f"verdict: {self.verdict()}"])

    def json(self) -> str:
        return json.dumps({"facts": self.facts, "problems": self.problems, "notes": self.notes, "ok": self.ok, "verdict": self.verdict()}, indent=2)


def check_torch(report: Report) -> None:
    import torch

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build, torch.version.cuda is None"
    report.facts["torch"] = f"{torch.__version__} ({cuda}); torch.cuda.is_available(): {torch.cuda.is_available()}"
    listed = host.gpus_listed()
    report.facts["GPUs (nvidia-smi)"] = "; ".join(listed) if listed else ("none" if not host.gpu_present() else "a GPU is installed but nvidia-smi lists none")
    report.facts["GPUs (torch)"] = "; ".join(host.cuda_devices()) or "none"
    driver = host.driver_cuda()
    report.facts["driver CUDA"] = driver or "-"
    if driver and torch.version.cuda and torch.cuda.is_available() and host.version_tuple(torch.version.cuda) > host.version_tuple(driver):
        report.notes.append(f"torch's CUDA {torch.version.cuda} is newer than the driver's {driver}: it runs through CUDA's minor-version "
                            f"compatibility, which lacks a few features (PTX JIT); a driver update or a {host.torch_wheels_for(driver)} torch avoids it")


def check_accelerator(report: Report) -> None:
    """DeepSpeed's accelerator and why; a GPU it would leave unused is the launch's refusal."""
    report.facts = {"accelerator": f"{host.accelerator()} ({host.accelerator_reason()})", **report.facts}  # first: what the rest is read against
    if refusal := host.silent_cpu_fallback():
        report.problems.append(refusal)
    elif host.gpu_present() and host.on_cpu():
        report.notes.append("a GPU is installed, and DS_ACCELERATOR=cpu trains on the CPU on purpose")


def check_deepspeed(report: Report) -> bool:
    """DeepSpeed's version, compiled ops and the internals dsee_scale reads; False where it cannot
    be imported (nothing that asks its accelerator can run then)."""
    try:
        import deepspeed
        from deepspeed.git_version_info import installed_ops
    except ImportError as err:
        report.facts["deepspeed"] = f"not importable ({err})"
        report.problems.append(f"DeepSpeed cannot be imported ({err}): run `make setup`")
        return False
    from dsee_scale.zero import compat

    compiled = sorted(op for op, built in installed_ops.items() if built)
    report.facts["deepspeed"] = f"{deepspeed.__version__} (dsee_scale was written for {compat.WRITTEN_FOR})"
    report.facts["deepspeed ops compiled"] = ", ".join(compiled) or "none (each is JIT-compiled on first use: ninja and a compiler, on GPUs the CUDA toolkit)"
    try:
        compat.check_deepspeed()
        report.facts["deepspeed internals"] = "all that dsee_scale reads are there (zero/compat.check_deepspeed passes)"
    except RuntimeError as err:
        report.facts["deepspeed internals"] = "missing"
        report.problems.append(str(err))
    return True


def check_communication(report: Report) -> None:
    import torch
    import torch.distributed as dist

    nccl = "not available"
    if dist.is_nccl_available() and torch.version.cuda:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    report.facts["nccl / gloo"] = f"{nccl} / {'available' if dist.is_gloo_available() else 'not available'}"
    backend = "nccl" if host.accelerator() == "cuda" else "gloo" if host.on_cpu() else None
    if backend == "nccl" and not dist.is_nccl_available():
        report.problems.append("DeepSpeed's accelerator is cuda but this torch has no NCCL, which its ranks communicate through: install torch from pytorch.org's CUDA wheels (`make setup`)")
    if backend == "gloo" and not dist.is_gloo_available():
        report.problems.append("DeepSpeed's accelerator is the CPU but this torch has no gloo, which CPU ranks communicate through: install torch's standard CPU wheel (`make setup`)")
    report.facts["libaio"] = "installed" if libaio_ready() else "missing (only NVMe offload, zero3_nvme, needs it: apt-get install libaio-dev)"
    if importlib.util.find_spec("mpi4py") is None:
        report.facts["mpi4py"] = "missing (only mpirun/srun launches need it: pip install mpi4py)"
    else:
        import mpi4py

        report.facts["mpi4py"] = f"{mpi4py.__version__} (mpirun: {shutil.which('mpirun') or 'not on PATH'})"


def check_precision(report: Report, ds_config: str | None) -> None:
    """The config a run without --ds_config would choose and, for a named one, whether its
    precision runs here (the launch's own check)."""
    name, why = host.default_ds_config()
    report.facts["default --ds_config"] = f"{name} ({why})"
    if ds_config is None:
        return
    try:
        config = load_ds_config(ds_config)
    except ConfigError as err:
        report.problems.append(str(err))
        return
    if problem := host.precision_problem(config, ds_config):
        report.problems.append(problem)
    elif host.on_cpu():
        report.notes.append(f"{ds_config} runs in fp32 here: the launch switches bf16 and fp16 off on the CPU")


def diagnose(ds_config: str | None = None) -> Report:
    report = Report()
    check_torch(report)
    if check_deepspeed(report):
        check_accelerator(report)
        check_communication(report)
        check_precision(report, ds_config)
    return report


def main(argv: list[str] | None = None) -> int:
    """Print the report; 0 when this machine can train, 1 on a known-bad combination."""
    parser = argparse.ArgumentParser(prog="python -m dsee_scale.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON (facts, problems, notes, ok, verdict)")
    parser.add_argument("--ds_config", help="also check this DeepSpeed config (a file or a built-in name) against the device's precision")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout: the report alone goes there
        report = diagnose(args.ds_config)
    print(report.json() if args.json else report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
