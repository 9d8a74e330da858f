"""The two install paths (docs/setup.md): scripts/setup.sh's choices, its apt step and its torch,
checked with fake system commands; and `pip install -e .` into an environment that already holds
torch and the rest, without constraints.txt: pyproject's floors accept what is there, and the
console script runs."""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT

SETUP = ROOT / "scripts" / "setup.sh"
APT = ["python3-venv", "python3-dev", "build-essential", "libaio-dev", "libopenmpi-dev", "openmpi-bin", "numactl", "libjemalloc2"]
TOOLS = ["bash", "dirname", "grep", "sed", "sort", "head", "env", "cat", "true"]  # what setup.sh's checks run, beside the fakes


def fake_host(tmp_path: Path, commands: dict[str, str]) -> dict:
    """An environment whose PATH holds only the tools setup.sh's checks need and `commands`
    (name -> shell script body): no real dpkg, sudo, apt-get or nvidia-smi can be reached."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, body in commands.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path), "VENV": str(tmp_path / "venv")}


def setup_sh(mode: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("bash"), str(SETUP), mode], env=env, capture_output=True, text=True, timeout=30)


def dpkg_holding(*installed: str) -> str:
    return f'case " {" ".join(installed)} " in *" $2 "*) exit 0;; *) exit 1;; esac'


APT_LOG = 'echo "$0 $*" >> "$HOME/apt.log"'


@pytest.mark.parametrize("case, uid, sudo, skip", [
    ("SKIP_APT=1 as root", 0, APT_LOG, "1"),
    ("not root, no passwordless sudo", 1000, "exit 1", "0"),
])
def test_apt_lists_what_is_missing_and_goes_on_when_it_cannot_install(tmp_path, case, uid, sudo, skip):
    env = {**fake_host(tmp_path, {"dpkg": dpkg_holding("numactl", "build-essential"), "id": f"echo {uid}", "sudo": sudo, "apt-get": APT_LOG}),
           "SKIP_APT": skip}
    out = setup_sh("--apt-only", env)
    missing = [p for p in APT if p not in ("numactl", "build-essential")]
    assert out.returncode == 0, out.stderr
    assert f"missing {' '.join(missing)}, not installed" in out.stdout and f"apt-get install -y --no-install-recommends {' '.join(missing)}" in out.stdout, out.stdout
    assert not (tmp_path / "apt.log").exists(), "apt-get ran"


@pytest.mark.parametrize("uid, sudo", [(0, "exit 1"), (1000, '[ "$1" = -n ] && shift; exec "$@"')], ids=["root", "passwordless sudo"])
def test_apt_installs_what_is_missing_as_root_or_with_passwordless_sudo(tmp_path, uid, sudo):
    env = fake_host(tmp_path, {"dpkg": dpkg_holding(*APT[1:]), "id": f"echo {uid}", "sudo": sudo, "apt-get": APT_LOG})
    out = setup_sh("--apt-only", env)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert [c.split()[1:] for c in calls] == [["update", "-qq"], ["install", "-y", "-qq", "--no-install-recommends", "python3-venv"]], calls


def test_apt_is_not_asked_when_everything_is_there(tmp_path):
    env = fake_host(tmp_path, {"dpkg": "exit 0", "id": "echo 1000", "sudo": "exit 1", "apt-get": APT_LOG})
    out = setup_sh("--apt-only", env)
    assert out.returncode == 0 and out.stdout == "" and not (tmp_path / "apt.log").exists(), out.stdout + out.stderr


CU = "https://download.pytorch.org/whl/cu"
PIN = next(line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))


@pytest.mark.parametrize("held, driver_cuda, asked, chosen", [
    (None, None, {}, f"torch: {PIN} because this host has no nvidia-smi"),  # this CPU box, a new venv: as before
    ("2.13.0+cpu False", None, {}, "torch: keeping torch 2.13.0+cpu because this host has no nvidia-smi"),
    ("2.9.1+cu128 True", "12.9", {"TORCH_SPEC": "torch==2.13.0"}, "keeping torch 2.9.1+cu128 because its CUDA works (a working CUDA torch is never replaced; TORCH_SPEC ignored)"),
    (None, "12.9", {}, f"torch: {PIN} from {CU}128 because nvidia-smi reports CUDA 12.9 (the newest build it runs: CUDA 12.8)"),
    (None, "13.2", {}, f"from {CU}130 because"),
    (None, "12.6", {}, f"from {CU}126 because"),
    ("2.13.0+cpu False", "12.8", {}, f"from {CU}128 because nvidia-smi reports CUDA 12.8 (the newest build it runs: CUDA 12.8), and the torch here (2.13.0+cpu) has no working CUDA"),
    (None, "12.9", {"TORCH_SPEC": "torch==2.12.0", "TORCH_INDEX_URL": f"{CU}126"}, f"torch: torch==2.12.0 from {CU}126 because TORCH_INDEX_URL names it"),
    (None, None, {"TORCH_SPEC": "torch==2.12.0"}, "torch: torch==2.12.0 because this host has no nvidia-smi"),
])
def test_torch_fits_the_host(tmp_path, held, driver_cuda, asked, chosen):
    fakes = {"nvidia-smi": f'echo "| NVIDIA-SMI 570.00   Driver Version: 570.00   CUDA Version: {driver_cuda}     |"'} if driver_cuda else {}
    env = {**fake_host(tmp_path, fakes), **asked}
    if held:
        (tmp_path / "venv" / "bin").mkdir(parents=True)
        (tmp_path / "venv" / "bin" / "python").write_text(f"#!/bin/sh\necho '{held}'\n")
        (tmp_path / "venv" / "bin" / "python").chmod(0o755)
    out = setup_sh("--torch-choice", env)
    assert out.returncode == 0 and chosen in out.stdout, out.stdout + out.stderr


def test_a_driver_older_than_every_cuda_build_is_refused_with_what_to_do(tmp_path):
    env = fake_host(tmp_path, {"nvidia-smi": 'echo "CUDA Version: 11.8"'})
    out = setup_sh("--torch-choice", env)
    assert out.returncode == 1 and "reports CUDA 11.8, older than the oldest CUDA build of torch (12.6)" in out.stderr and "TORCH_INDEX_URL" in out.stderr


def venv_holding(tmp_path: Path, site_packages: Path, own_pip: bool = False) -> Path:
    """A fresh venv that sees `site_packages` after its own, as an environment that already has
    torch (and the rest) does; without `own_pip`, the pip of `site_packages` runs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", *([] if own_pip else ["--without-pip"]), str(venv)], check=True, timeout=120)
    own = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True, check=True).stdout.strip()
    (Path(own) / "held.pth").write_text(f"{site_packages}\n")
    return venv


def pip_env(**extra: str) -> dict:
    """This environment without pip settings (PIP_*), so only pip's own defaults and `extra` apply."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")}, "PYTHONNOUSERSITE": "1", **extra}


def assert_dsee_train_runs(venv: Path) -> None:
    out = subprocess.run([venv / "bin" / "dsee-train", "--help"], capture_output=True, text=True, timeout=120, cwd=venv)
    assert out.returncode == 0 and "usage: dsee-train" in out.stdout and "--ds_config" in out.stdout and "--prune.sparsity" in out.stdout, out.stdout + out.stderr


def test_pip_install_editable_into_an_environment_that_holds_everything(tmp_path):
    """No pip config, no index, no constraints: pip must find every requirement already there,
    so it installs dsee_scale alone (and never touches the held environment)."""
    venv = venv_holding(tmp_path, Path(sysconfig.get_path("purelib")))
    out = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--no-index", "--no-build-isolation", "--disable-pip-version-check", "-e", str(ROOT)],
                         capture_output=True, text=True, timeout=120, env=pip_env(PIP_CONFIG_FILE=os.devnull))
    assert out.returncode == 0, out.stdout + out.stderr
    installed = [line for line in out.stdout.splitlines() if line.startswith("Successfully installed")]
    assert installed == ["Successfully installed dsee_scale-0.1.0"], out.stdout
    assert_dsee_train_runs(venv)
    doctor = subprocess.run([venv / "bin" / "python", "-m", "dsee_scale.doctor"], capture_output=True, text=True, timeout=120, cwd=venv)
    assert doctor.returncode == 0 and "verdict: ready to train on cpu" in doctor.stdout, doctor.stdout + doctor.stderr


def dists_required_by(name: str) -> set[str]:
    """`name` and every distribution it requires, transitively, as installed here (extras left out)."""
    from packaging.requirements import Requirement

    seen, todo = set(), [name]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


@pytest.mark.slow
def test_pip_install_from_pypi_beside_a_held_torch(tmp_path):
    """The real thing: a venv that holds only torch (and what torch requires), then
    `pip install -e ".[test]"` with the host's pip config, resolving the rest from the indexes."""
    held = tmp_path / "held"
    held.mkdir()
    for name in dists_required_by("torch"):
        for top in {Path(str(f)).parts[0] for f in importlib.metadata.distribution(name).files} - {".."}:
            source = Path(sysconfig.get_path("purelib")) / top
            if source.exists() and not (held / top).exists():
                (held / top).symlink_to(source)
    venv = venv_holding(tmp_path, held, own_pip=True)
    out = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check", "-e", f"{ROOT}[test]"],
                         capture_output=True, text=True, timeout=1800, env=pip_env())
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    installed = out.stdout.rpartition("Successfully installed")[2].split()
    assert installed and not any(dist.startswith("torch-") for dist in installed), "pip replaced the held torch"
    assert_dsee_train_runs(venv)
