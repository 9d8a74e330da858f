"""A simulated NVIDIA GPU host for the launch checks and `python -m dsee_scale.doctor`: a fake
`nvidia-smi` that answers as a driver would, first on PATH."""
import os
from pathlib import Path

GPU_LINE = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)"


def fake_nvidia_smi(folder: Path, driver_cuda: str = "12.4") -> Path:
    """`folder` holding an executable nvidia-smi: `-L` lists one H100, no argument prints the
    header whose "CUDA Version" is the newest CUDA the driver runs. Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"""#!/bin/sh
if [ "$1" = "-L" ]; then echo "{GPU_LINE}"; exit 0; fi
echo "| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: {driver_cuda}     |"
""")
    script.chmod(0o755)
    return folder


def gpu_host_env(folder: Path, driver_cuda: str = "12.4") -> dict[str, str | None]:
    """Environment changes that make a process see a GPU host: the fake nvidia-smi first on PATH
    and DS_ACCELERATOR unset (the suite pins it to cpu, the opt-in this host's check honours)."""
    return {"PATH": f"{fake_nvidia_smi(folder, driver_cuda)}{os.pathsep}{os.environ['PATH']}", "DS_ACCELERATOR": None}
