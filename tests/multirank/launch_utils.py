"""Run a script on 2 CPU ranks, under a real launcher or started directly; fail the test with
its output if it fails."""
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from conftest import ROOT

VENV_BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
HOSTSIM = HERE / "hostsim"
RANKS = HERE.relative_to(ROOT) / "ranks"  # the rank scripts, as a path from the repository root (where launches start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(script: str, args: list[str], nproc: int, env: dict, cwd: Path, timeout: int, port: str | None = None) -> subprocess.CompletedProcess:
    """The ranks started directly with the environment launchers give them (torchrun's contract;
    LOCAL_SIZE as DeepSpeed's launcher sets it). No launcher process: DeepSpeed's costs ~8 s of
    imports per launch, most of a small test. As launchers do, when a rank fails the others are
    killed; the job's code is the first failure's. test_launchers shows the launchers equal.
    `port`: the rendezvous port, for a test that looks for what the run left behind; else a free one."""
    port, procs, logs = port or str(free_port()), [], []
    for rank in range(nproc):
        world = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        logs.append(tempfile.TemporaryFile(mode="w+"))
        procs.append(subprocess.Popen([sys.executable, "-u", script, *args], cwd=cwd, env={**env, **world}, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
    deadline, code = time.monotonic() + timeout, 0
    try:
        while any(p.poll() is None for p in procs) and not code:
            code = next((p.returncode for p in procs if p.returncode not in (None, 0)), 0)
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired([script, *args], timeout)
            time.sleep(0.05)
        code = code or next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    output = ""
    for rank, log in enumerate(logs):
        log.seek(0)
        output += f"--- rank {rank} ---\n{log.read()}"
        log.close()
    return subprocess.CompletedProcess([sys.executable, script, *args], code, stdout="", stderr=output)


def launcher_command(launcher: str, script: str, nproc: int = 2) -> list[str]:
    port = str(free_port())
    if launcher == "deepspeed":
        return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, script]
    if launcher == "torchrun":
        return [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, script]
    if launcher == "mpirun":
        return ["mpirun", "-np", str(nproc), "--allow-run-as-root", "--oversubscribe", "-x", f"MASTER_PORT={port}", sys.executable, script]
    raise ValueError(launcher)


# What DeepSpeed's accelerator reports on the CPU hosts this project meets (Intel with mkldnn fp16;
# AMD EPYC without it), simulated in every process of a launch by tests/multirank/hostsim/sitecustomize.py.
SIMULATED_HOSTS = {"fp16": "fp16=1,bf16=1", "no-fp16": "fp16=0,bf16=1"}


def host_env(host: str | None) -> dict:
    """Environment for a launch that simulates `host` (a SIMULATED_HOSTS key); None: this machine."""
    if host is None:
        return {"PYTHONPATH": str(ROOT)}
    return {"PYTHONPATH": f"{HOSTSIM}:{ROOT}", "DSEE_SIMULATE_HOST": SIMULATED_HOSTS[host]}


def launch(launcher: str, script: str, args: list, timeout: int = 300, nproc: int = 2, env: dict | None = None, host: str | None = None, cwd: Path = ROOT,
           base_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run script under launcher ("deepspeed", "torchrun", "mpirun", or "ranks": started directly)
    with nproc ranks; host simulates another kind of CPU host. Launched once: a rank that fails,
    however (an abort at exit included), fails the launch. base_env: the environment the ranks
    start from instead of this process's (the gpu tier's: GPU_HOST_ENV, without the CPU pins)."""
    # One thread per rank under every launcher (torchrun's default; 2 ranks share 2 cores here):
    # float sums that a thread count can reorder then agree to the last bit across launchers.
    # PYTHONFAULTHANDLER: a rank that dies on a signal (an abort: SIGABRT) prints every thread's Python stack.
    base = os.environ if base_env is None else base_env
    full_env = {**base, "PATH": f"{VENV_BIN}:{base['PATH']}", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **host_env(host), **(env or {})}
    run_args = [str(a) for a in args]
    if launcher == "ranks":
        return spawn_ranks(script, run_args, nproc, full_env, cwd, timeout, port=(env or {}).get("MASTER_PORT"))
    return subprocess.run(launcher_command(launcher, script, nproc) + run_args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_launcher(launcher: str, script: str, args: list, **options) -> str:
    """launch(), failing the test with the job's output unless every rank succeeded: the end of
    each rank's own output where the ranks were started directly (a rank's stack stays in view)."""
    proc = launch(launcher, script, args, **options)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, proc.args))} failed ({proc.returncode}):\n{tail_per_rank(output, 6000)}"
    return output


def progress_bar_in(output: str) -> bool:
    """Whether a job's output shows a tqdm bar ("[00:01<00:02, ..." or "[00:00, ..."): read back as
    text, the carriage returns a bar writes come back as newlines, so they cannot be looked for."""
    return re.search(r"\[\d\d:\d\d[<,]", output) is not None


def tail_per_rank(output: str, chars: int) -> str:
    """The last `chars` characters of a job's output, shared between the ranks spawn_ranks labelled.
    The list of extension modules a fatal error ends with is dropped: the stacks above it stay."""
    output = re.sub(r"\nExtension modules: [^\n]*", "\n[extension modules listed]", output)
    head, *ranks = output.split("--- rank ")
    if not ranks:
        return output[-chars:]
    share = chars // len(ranks)
    tails = []
    for part in ranks:
        label, _, log = part.partition("\n")
        tails.append(f"--- rank {label}\n{log[-share:]}")
    return head[-share:] + "".join(tails)


def one_process(args: list, env: dict[str, str | None] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """launch/train.py as a plain single process (world size 1), offline; `env` adds to this
    process's environment (None: removes the variable)."""
    # A world of one on a free port: DeepSpeed's default port (29500) would collide with any
    # other single-process run at the same time.
    world = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    full_env = {**os.environ, **world, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    full_env = {key: value for key, value in full_env.items() if value is not None}
    return subprocess.run([sys.executable, "launch/train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
