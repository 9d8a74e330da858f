"""GPU hosts, simulated on this CPU machine (a fake nvidia-smi first on PATH; torch's and
DeepSpeed's answers monkeypatched): a GPU the run would leave unused is refused before any work,
the DeepSpeed config is chosen by device and named by path or built-in name, fp16 and bf16
without native support are refused, and `python -m dsee_scale.doctor` reports all of it.
(tests/multirank/test_gpu_host.py: the refusal and the opt-in as a real launch/train.py.)"""
import json
import time

import pytest
import torch
from conftest import ROOT

from dsee_scale import doctor, host
from dsee_scale.cli import main
from dsee_scale.config import TrainConfig
from dsee_scale.ds_config import BUILTIN_DIR, ConfigError, builtin_names, resolve_ds_config
from dsee_scale.run_folder import identity_differences, run_identity
from dsee_scale.validate import choose_ds_config
from dsee_scale.zero import compat

from helpers.bad_inputs import write
from helpers.gpu_host import GPU_LINE, gpu_host_env

H100, V100 = "NVIDIA H100 80GB HBM3 (compute capability 9.0)", "Tesla V100-SXM2-16GB (compute capability 7.0)"


@pytest.fixture
def gpu_host(tmp_path, monkeypatch):
    """This machine with an H100 whose driver runs CUDA 12.4 (the fake nvidia-smi), DS_ACCELERATOR
    unset, torch a CPU-only build: DeepSpeed's accelerator stays the CPU."""
    for key, value in gpu_host_env(tmp_path / "bin").items():
        monkeypatch.delenv(key) if value is None else monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.version, "cuda", None)


@pytest.fixture
def cuda(monkeypatch):
    """`on(bf16)`: a working CUDA host (DeepSpeed's accelerator cuda, torch built for the driver's
    CUDA 12.4 with NCCL) whose GPU is an H100 (native bf16) or a V100 (none)."""
    def on(bf16: bool) -> None:
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
        for name, value in (("accelerator", lambda: "cuda"), ("native_bf16", lambda: bf16), ("cuda_devices", lambda: [H100 if bf16 else V100]),
                            ("gpu_present", lambda: True), ("gpus_listed", lambda: [GPU_LINE]), ("driver_cuda", lambda: "12.4")):
            monkeypatch.setattr(host, name, value)
        monkeypatch.setattr(torch.version, "cuda", "12.4")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
        monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 21, 5))
    return on


# ---- no silent CPU fallback ----------------------------------------------------------------------
def test_a_gpu_the_run_would_leave_unused_is_refused_before_any_work(gpu_host, tmp_path, capsys):
    tic = time.time()
    assert main(["--model", "builtin:tiny-llama", "--steps", "2", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"dsee_scale: error: this machine has an NVIDIA GPU (nvidia-smi lists {GPU_LINE!r}) but DeepSpeed's accelerator is the CPU" in err
    assert "CUDA is unusable because torch" in err and "is a CPU-only build (torch.version.cuda is None)" in err
    assert "Fix: install torch built for a CUDA the driver runs: TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 make setup (cu124: the driver's CUDA 12.4, or older)" in err
    assert "`python -m dsee_scale.doctor`; or set DS_ACCELERATOR=cpu to train on the CPU on purpose" in err
    assert time.time() - tic < 10 and not (tmp_path / "out").exists()


def test_cpu_on_purpose_passes_and_so_does_a_gpu_in_use(gpu_host, monkeypatch):
    assert host.silent_cpu_fallback() is not None
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert host.silent_cpu_fallback() is None
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setattr(host, "accelerator", lambda: "cuda")
    assert host.silent_cpu_fallback() is None


@pytest.mark.parametrize("torch_cuda, visible, why, fix", [
    ("12.8", None, "is built for CUDA 12.8, newer than the driver's CUDA 12.4", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 make setup"),
    ("12.4", "", "CUDA_VISIBLE_DEVICES='' hides every GPU from torch", "unset CUDA_VISIBLE_DEVICES"),
    ("12.4", None, "(CUDA 12.4) finds no usable GPU (torch.cuda.is_available() is False)", "check the driver: nvidia-smi must list the GPU"),
], ids=["cuda-build-newer-than-driver", "gpus-hidden", "driver"])
def test_the_refusal_names_why_torch_cannot_use_the_gpu_and_the_fix(gpu_host, monkeypatch, torch_cuda, visible, why, fix):
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES") if visible is None else monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    refusal = host.silent_cpu_fallback()
    assert "CUDA is unusable because " in refusal and why in refusal, refusal
    assert "Fix: " in refusal and fix in refusal and "DS_ACCELERATOR=cpu" in refusal


# ---- the DeepSpeed config: chosen by device, named by path or built-in name -------------------------
def test_the_default_ds_config_is_chosen_by_device_and_said(cuda, capsys):
    cfg = TrainConfig()
    choose_ds_config(cfg)
    assert cfg.ds_config == "zero3" and "DeepSpeed config zero3, chosen by device: DeepSpeed's accelerator is the CPU: fp32" in capsys.readouterr().out
    cuda(bf16=True)
    cfg = TrainConfig()
    choose_ds_config(cfg)
    assert cfg.ds_config == "zero3_bf16" and f"chosen by device: {H100} computes in bf16 natively" in capsys.readouterr().out
    cuda(bf16=False)
    cfg = TrainConfig()
    choose_ds_config(cfg)
    assert cfg.ds_config == "zero3" and f"{V100} has no native bf16 (it needs compute capability 8.0, Ampere, or newer): fp32" in capsys.readouterr().out


def test_native_bf16_on_cuda_does_not_count_emulation(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes on a V100 (emulated, slower than fp32)."""
    monkeypatch.setattr(host, "accelerator", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not host.native_bf16()


def test_a_ds_config_is_a_file_or_a_built_in_name_from_any_folder(tmp_path, monkeypatch):
    assert (ROOT / "ds_configs").is_symlink() and (ROOT / "ds_configs").resolve() == BUILTIN_DIR  # the checkout's paths keep working
    monkeypatch.chdir(tmp_path)
    for given in ("zero3_bf16", "zero3_bf16.json", "ds_configs/zero3_bf16.json", str(ROOT / "ds_configs" / "zero3_bf16.json")):
        name, file = resolve_ds_config(given)
        assert name == "zero3_bf16" and file.resolve() == BUILTIN_DIR / "zero3_bf16.json", given
    write(tmp_path / "zero3.json", "{}")  # a file of the user's wins over the built-in of its name
    name, file = resolve_ds_config("zero3.json")
    assert name == "zero3.json" and file.resolve() == (tmp_path / "zero3.json").resolve()
    with pytest.raises(ConfigError, match=f"DeepSpeed config nope.json does not exist: pass --ds_config a JSON file or a built-in name: {', '.join(builtin_names())}"):
        resolve_ds_config("nope.json")
    assert {"zero3", "zero3_bf16", "zero3_nvme"} <= set(builtin_names())


def test_a_resume_with_the_default_on_the_same_host_is_the_same_run(cuda):
    batch = {"train_batch_size": 8}
    by_default, by_path = TrainConfig(), TrainConfig(ds_config="ds_configs/zero3.json")
    choose_ds_config(by_default)
    choose_ds_config(by_path)
    saved = run_identity(by_default, batch)
    assert identity_differences(saved, run_identity(by_path, batch)) == []
    cuda(bf16=True)
    on_gpu = TrainConfig()
    choose_ds_config(on_gpu)
    assert identity_differences(saved, run_identity(on_gpu, batch)) == ["ds_config: checkpoint 'zero3', now 'zero3_bf16'"]
    saved.pop("ds_config")  # a checkpoint written before the identity recorded it resumes as before
    assert identity_differences(saved, run_identity(on_gpu, batch)) == []


def test_a_resume_on_another_kind_of_device_names_the_config(cuda, tmp_path):
    from dsee_scale import checkpoint
    from dsee_scale.validate import check_resumable

    on_cpu = TrainConfig(output_dir=str(tmp_path), resume=True)
    choose_ds_config(on_cpu)
    (tmp_path / "checkpoints" / "tune-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "tune-2" / checkpoint.STATE).write_text(json.dumps({"format": checkpoint.FORMAT, "identity": run_identity(on_cpu, {"train_batch_size": 8})}))
    (tmp_path / "checkpoints" / checkpoint.LATEST).write_text("tune-2")
    cuda(bf16=True)
    on_gpu = TrainConfig(output_dir=str(tmp_path), resume=True)
    choose_ds_config(on_gpu)
    with pytest.raises(ConfigError, match=r"is of another run: ds_config: checkpoint 'zero3', now 'zero3_bf16' \(pass the checkpoint's --ds_config: one left out is chosen by this machine's device\)"):
        check_resumable(on_gpu, {"train_batch_size": 8})


# ---- precision the device cannot run ----------------------------------------------------------------
def test_fp16_is_refused_on_a_gpu_and_switched_off_on_the_cpu(cuda, tmp_path, capsys):
    fp16 = write(tmp_path / "fp16.json", json.dumps({**json.loads((BUILTIN_DIR / "zero3.json").read_text()), "fp16": {"enabled": True}}))
    assert host.precision_problem({"fp16": {"enabled": True}}, "fp16.json") is None  # the CPU runs it in fp32, as before
    cuda(bf16=True)
    assert main(["--ds_config", fp16, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"DeepSpeed config {fp16} enables fp16, which dsee_scale does not support" in err
    assert "use bf16 on a GPU that has it (Ampere or newer: --ds_config zero3_bf16), fp32 otherwise (--ds_config zero3)" in err
    assert not (tmp_path / "out").exists()


def test_bf16_is_refused_on_a_gpu_without_it(cuda, tmp_path, capsys):
    cuda(bf16=False)
    assert main(["--ds_config", "zero3_bf16", "--output_dir", str(tmp_path / "out")]) == 2
    assert f"DeepSpeed config zero3_bf16 enables bf16, which {V100} has no native support for" in capsys.readouterr().err


# ---- python -m dsee_scale.doctor --------------------------------------------------------------------
def test_doctor_on_this_machine_says_it_can_train(capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    for fact in ("accelerator", "torch", "GPUs (nvidia-smi)", "driver CUDA", "deepspeed ops compiled", "deepspeed internals", "nccl / gloo", "libaio", "mpi4py", "default --ds_config"):
        assert f"\n{fact}  " in f"\n{out}", fact
    assert out.rstrip().endswith("verdict: ready to train on cpu")


def test_doctor_on_a_gpu_host_whose_torch_has_no_cuda_names_the_fix(gpu_host, capsys):
    assert doctor.main(["--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["facts"]["GPUs (nvidia-smi)"] == GPU_LINE and report["facts"]["driver CUDA"] == "12.4"
    assert report["facts"]["accelerator"].startswith("cpu (")
    assert not report["ok"] and report["problems"] == [host.silent_cpu_fallback()]
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 make setup" in report["problems"][0]


def test_doctor_on_a_working_gpu_host(cuda, capsys):
    cuda(bf16=True)
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "accelerator             cuda (auto-detected: torch sees 1 CUDA device(s))" in out
    assert f"GPUs (torch)            {H100}" in out and "nccl / gloo             2.21.5 / available" in out
    assert f"default --ds_config     zero3_bf16 ({H100} computes in bf16 natively)" in out
    assert out.rstrip().endswith("verdict: ready to train on cuda")


def test_doctor_names_a_config_whose_precision_the_gpu_lacks(cuda, capsys):
    cuda(bf16=False)
    assert doctor.main(["--ds_config", "zero3_bf16"]) == 1
    out = capsys.readouterr().out
    assert f"default --ds_config     zero3 ({V100} has no native bf16" in out
    assert f"problem: DeepSpeed config zero3_bf16 enables bf16, which {V100} has no native support for" in out


def test_doctor_names_a_deepspeed_without_the_internals_dsee_scale_reads(monkeypatch, capsys):
    monkeypatch.setattr(compat, "missing_internals", lambda: ["deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3._post_step"])
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert f"lacks internals dsee_scale relies on (deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3._post_step): dsee_scale was written for deepspeed {compat.WRITTEN_FOR}" in out
    assert "verdict: NOT ready: 1 problem(s) above" in out


def test_doctor_notes_a_torch_cuda_newer_than_the_driver_that_still_runs(cuda, monkeypatch, capsys):
    cuda(bf16=True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "note: torch's CUDA 12.8 is newer than the driver's 12.4: it runs through CUDA's minor-version compatibility" in out
    assert "a driver update or a cu124 torch avoids it" in out
