"""What this machine offers a run: GPUs, the torch build, DeepSpeed's accelerator and the precision
the device computes in natively. The launch checks (validate.py) and `python -m dsee_scale.doctor`
both read these facts here, so a refused launch and the doctor's report say the same.

Nothing is cached: each answer is read when asked (a run asks once, before any heavy work)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

TORCH_WHEELS = "https://download.pytorch.org/whl"


def gpu_present() -> bool:
    """An NVIDIA GPU is installed here, whatever torch makes of it: its driver's nvidia-smi lists
    one, or its device file exists. (A cluster image may ship nvidia-smi on CPU nodes too.)"""
    return Path("/dev/nvidia0").exists() or bool(gpus_listed())


def nvidia_smi(*args: str) -> str | None:
    """nvidia-smi's output, or None where it is missing or fails (a driver in a bad state)."""
    try:
        done = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def gpus_listed() -> list[str]:
    """The GPUs the driver sees (`nvidia-smi -L`), one line each."""
    return [line.strip() for line in (nvidia_smi("-L") or "").splitlines() if line.strip()]


def driver_cuda() -> str | None:
    """The newest CUDA version the installed driver runs ("CUDA Version" in nvidia-smi's header)."""
    found = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", nvidia_smi() or "")
    return found.group(1) if found else None


def version_tuple(text: str) -> tuple[int, ...]:
    """(major, minor) of a version such as "12.4" or "2.13.0+cu128"."""
    return tuple(int(part) for part in re.findall(r"[0-9]+", text)[:2])


def torch_wheels_for(cuda: str) -> str:
    """pytorch.org's name for the torch builds of a CUDA version ("12.4" → "cu124")."""
    return "cu" + "".join(map(str, version_tuple(cuda)))


def accelerator() -> str:
    """DeepSpeed's accelerator: where every rank's tensors and collectives go (cuda, cpu, ...)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def on_cpu() -> bool:
    return accelerator() == "cpu"


def cpu_on_purpose() -> bool:
    """DS_ACCELERATOR=cpu, the opt-in to train on the CPU of a machine that has a GPU."""
    return os.environ.get("DS_ACCELERATOR") == "cpu"


def accelerator_reason() -> str:
    """Why DeepSpeed chose its accelerator: DS_ACCELERATOR, or what its detection found in torch."""
    import torch

    if "DS_ACCELERATOR" in os.environ:
        return f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']} is set"
    if torch.cuda.is_available():
        return f"auto-detected: torch sees {torch.cuda.device_count()} CUDA device(s)"
    return "auto-detected: torch.cuda.is_available() is False"


def cuda_devices() -> list[str]:
    """The CUDA devices torch sees, by name and compute capability."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [f"{torch.cuda.get_device_name(i)} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(torch.cuda.device_count())]


def cuda_unusable() -> tuple[str, str]:
    """(why torch cannot use this machine's GPU, the fix), for a machine with a GPU whose runs
    would otherwise land on the CPU."""
    import torch

    driver = driver_cuda()
    wheel, newest = (torch_wheels_for(driver), f"the driver's CUDA {driver}") if driver else ("cuXY", "the CUDA version nvidia-smi shows")
    install = f"install torch built for a CUDA the driver runs: TORCH_INDEX_URL={TORCH_WHEELS}/{wheel} make setup ({wheel}: {newest}, or older)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)", install
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU from torch", "unset CUDA_VISIBLE_DEVICES (or list the GPUs to use in it)"
    if driver and version_tuple(torch.version.cuda) > version_tuple(driver):
        return f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, newer than the driver's CUDA {driver}", install
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU (torch.cuda.is_available() is False)",
            "check the driver: nvidia-smi must list the GPU")


def silent_cpu_fallback() -> str | None:
    """The refusal for a machine with a GPU where DeepSpeed's accelerator is the CPU, not chosen
    (DS_ACCELERATOR=cpu): such a run trains many times slower than it could, and says
    nothing about it. None where this is not the case. (nvidia-smi, the slow question, last: a
    run on CUDA or on a CPU by choice never starts it.)"""
    if cpu_on_purpose() or not on_cpu() or not gpu_present():
        return None
    listed = gpus_listed()
    seen = f"nvidia-smi lists {listed[0]!r}" if listed else "/dev/nvidia0 exists"
    why, fix = cuda_unusable()
    return (f"this machine has an NVIDIA GPU ({seen}) but DeepSpeed's accelerator is the CPU, so a run would train on the CPU: CUDA is unusable "
            f"because {why}. Fix: {fix}, then check with `python -m dsee_scale.doctor`; or set DS_ACCELERATOR=cpu to train on the CPU on purpose")


def native_bf16() -> bool:
    """The accelerator computes in bf16 natively: on CUDA, compute capability 8.0 (Ampere) or
    newer. torch's and DeepSpeed's own CUDA answers count emulation, which older GPUs (V100, T4)
    pass at a fraction of fp32's speed. (DeepSpeed says yes for every CPU.)"""
    import torch

    if accelerator() == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_bf16_supported())


def device_label() -> str:
    """The device as a user knows it: the first GPU's name and compute capability (the GPUs of a
    machine are alike), or the accelerator's name."""
    devices = cuda_devices() if accelerator() == "cuda" else []
    return devices[0] if devices else accelerator()


def default_ds_config() -> tuple[str, str]:
    """The built-in DeepSpeed config for a run that names none, and why: bf16 where the device
    computes in it natively, fp32 otherwise (CPUs: bf16 is switched off there anyway)."""
    if on_cpu():
        return "zero3", "DeepSpeed's accelerator is the CPU: fp32"
    if native_bf16():
        return "zero3_bf16", f"{device_label()} computes in bf16 natively"
    return "zero3", f"{device_label()} has no native bf16 (it needs compute capability 8.0, Ampere, or newer): fp32"


def precision_problem(config: dict, name: str) -> str | None:
    """Why DeepSpeed config `name` cannot train on this accelerator in the precision it asks for
    (None where it can). On the CPU the launch switches bf16 and fp16 off instead.

    fp16 is refused: the backbone is built in fp32 unless the config asks for bf16, so under
    ZeRO-3 DeepSpeed would run its fp16 loss scaling over fp32 weights (no fp16 compute at all),
    and under ZeRO-1/2 it would cast the built adapters and backbone to fp16 after Ω was chosen in
    fp32; neither is tested on a GPU."""
    if on_cpu():
        return None
    if config.get("fp16", {}).get("enabled"):
        return (f"DeepSpeed config {name} enables fp16, which dsee_scale does not support (the backbone is built in fp32 or bf16, and DeepSpeed's "
                f"fp16 loss scaling over it is untested): use bf16 on a GPU that has it (Ampere or newer: --ds_config zero3_bf16), fp32 otherwise "
                f"(--ds_config zero3), or leave --ds_config out to choose by device")
    if config.get("bf16", {}).get("enabled") and not native_bf16():
        return (f"DeepSpeed config {name} enables bf16, which {device_label()} has no native support for (it needs compute capability 8.0, "
                f"Ampere, or newer; emulated bf16 is slower than fp32): use an fp32 config (--ds_config zero3), or leave --ds_config out to choose by device")
    return None
