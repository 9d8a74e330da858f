"""One line about this host: what decides the dtypes DeepSpeed picks and the kernels that run,
so that a failure on another kind of machine reads as one (printed first by .ci/run)."""
import platform
import re
from importlib.metadata import version
from pathlib import Path

import torch

cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
flags = set(re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M).group(1).split()) if "flags" in cpuinfo else set()
shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_fp16", "amx_tile") if f in flags]
try:
    mkldnn_fp16 = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
except (AttributeError, RuntimeError):
    mkldnn_fp16 = False
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(
    f"host: {model.group(1) if model else platform.processor() or platform.machine()}; {torch.get_num_threads()} threads; "
    f"flags {' '.join(shown) or '-'}; mkldnn fp16 {'yes' if mkldnn_fp16 else 'no'} (DeepSpeed's CPU accelerator: fp16 {'yes' if mkldnn_fp16 else 'no'}, bf16 yes); "
    f"GPU {gpu}; python {platform.python_version()} torch {torch.__version__} deepspeed {version('deepspeed')} transformers {version('transformers')}",
    flush=True,
)
