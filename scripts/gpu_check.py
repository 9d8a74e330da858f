"""The real path on CUDA devices in one command, `bash scripts/gpu_check.sh` (under `timeout 540`);
`--cpu` runs the same steps on tiny models and 2 CPU ranks (tests/multirank/test_gpu_check.py,
part of `make test`).

1. environment: DeepSpeed's accelerator is cuda (else the check stops here), torch.version.cuda,
   the GPU's name and bf16 support, versions.
2. equivalence: the `gpu` test tier (`pytest -m gpu tests/gpu`): tiny LLaMA, GPT-2 and BERT under
   ZeRO-3 on the devices equal one plain process (fp32 without TF32: 1e-5; bf16: 2e-2), pruning
   masks of GPU shards equal torch.nn.utils.prune's, exports reload. --cpu: its fp32 LLaMA tests.
3. pipeline: builtin:medium-llama (LLaMA-shaped, 0.31B parameters) on bf16 ZeRO-3: tune → 50%
   prune → re-tune → export (hf and compressed) → evaluate with whole-model generation. The run is
   killed (DSEE_FAULT_INJECT) while it writes its last re-tune checkpoint, after logging every
   step's loss, and resumed from the re-tune checkpoint before: it gives the losses the killed run
   logged, and both its exports, reloaded without DeepSpeed, give the engine's logits.
4. speed: tokens/s and peak device memory of dsee, peft_lora (the same trainable budget: rank 16
   on q and v; DSEE adds 64 sparse entries a matrix), DeepSpeed's OptimizedLinear LoRA (ZeRO-2) and
   full fine-tuning on medium-llama, seq 1024, bf16 (benchmarks/memory_worker.py); the DSEE ÷ PEFT
   LoRA ratio against its target, 0.95 (reported as meets_target, not a failure).

One GPU: one rank (still ZeRO-3); 2 or more: 2 NCCL ranks. Each step prints one JSON line, appended
to <out>/gpu_check.jsonl (commit a GPU run's lines to benchmarks/results/gpu_check.jsonl), its
launches' output goes to <out>/logs/, and a step runs even where one before it failed (only a
failed environment step ends the check); the exit status is 1 if any step failed.

Budget on one H100, estimated before any run there (each step has a cap, Mode.caps_s, so that one
that hangs fails alone): environment 10 s; equivalence 2 min (7 launches of tiny models, ~10 s of
imports each); pipeline 2 min (the killed run ~60 s, the resumed one ~40 s, both exports reloaded
~15 s); speed 1.7 min (4 launches of ~25 s, 13 steps each): about 6 of the 9 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGIT_ROWS = 4
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}  # fp32: max |Δ| of logits, relative Δ of losses; bf16: relative L2 of logits and Δ of losses
SPEED_METHODS = ("dsee", "peft_lora", "optimized_linear", "full")
SPEED_TARGET = 0.95  # DSEE's tokens/s ÷ PEFT LoRA's
STEPS = ("environment", "equivalence", "pipeline", "speed")
ON_CPU = "DSEE_GPU_TIER_ON_CPU"  # tests/gpu runs on 2 CPU ranks


@dataclass(frozen=True)
class Mode:
    """What each step runs on the GPU or, with --cpu, on CPU ranks."""

    device: str
    precision: str
    tier: list[str]  # pytest arguments choosing the gpu tier's tests
    pipeline: list  # flags of the pipeline's run (launch/train.py's)
    retune_steps: int  # the pipeline is killed writing re-tune checkpoint retune_steps (its last) ...
    save_every: int  # ... and resumed from the one save_every steps before
    speed: list  # memory_worker.py flags
    speed_configs: dict[str, str]  # method → DeepSpeed config, where not memory_worker.py's default
    caps_s: dict[str, int]  # each step's time limit


MODES = {
    "gpu": Mode("cuda", "bf16", [],
                ["--model", "builtin:medium-llama", "--ds_config", "ds_configs/zero3_bf16.json", "--steps", 16, "--micro_batch_size", 4,
                 "--gen_samples", 8, "--gen_max_new_tokens", 16], 12, 4,
                ["--model", "medium-llama", "--seq", 1024, "--batch", 4, "--steps", 10, "--warmup", 3, "--rank", 16, "--bf16", "--no_comms_log"],
                {"dsee": "ds_configs/zero3_bf16.json", "peft_lora": "ds_configs/zero3_bf16.json", "full": "ds_configs/zero3_bf16.json",
                 "optimized_linear": "ds_configs/zero2_bf16.json"},
                {"equivalence": 180, "pipeline": 200, "speed": 140}),
    "cpu": Mode("cpu", "fp32", ["-k", "fp32-llama"],
                ["--model", "builtin:tiny-llama", "--ds_config", "ds_configs/zero3.json", "--steps", 2, "--micro_batch_size", 4, "--max_train_samples", 64,
                 "--max_eval_samples", 16, "--prune.calibration_batches", 2, "--gen_samples", 2, "--gen_max_new_tokens", 4], 4, 2,
                ["--model", "tiny-llama", "--seq", 32, "--batch", 2, "--steps", 1, "--warmup", 1, "--rank", 4, "--bf16", "--no_comms_log"],
                {}, {"equivalence": 300, "pipeline": 300, "speed": 300}),
}


class StepFailed(Exception):
    """A step's check failed; `output`: the end of what its launch printed."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output[-3000:]


def worker(argv: list[str]) -> None:
    """Under the launcher: the shipped Recipe, then the engine's logits on the first eval rows;
    the rank then leaves as dsee-train's do (cli.leave: no interpreter teardown to abort in)."""
    import torch

    from dsee_scale import dist
    from dsee_scale.cli import leave
    from dsee_scale.config import train_config_from_argv
    from dsee_scale.data import collate
    from dsee_scale.trainer import Recipe

    recipe = Recipe(train_config_from_argv(argv))
    recipe.setup()
    recipe.run()
    batch = {k: v.to(recipe.engine.device) for k, v in collate(recipe.eval_rows[:LOGIT_ROWS], recipe.tokenizer).items()}
    recipe.engine.eval()
    with torch.no_grad():
        logits = recipe.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if dist.is_main():
        torch.save({"logits": logits.float().cpu(), "input_ids": batch["input_ids"].cpu(), "attention_mask": batch["attention_mask"].cpu()}, recipe.run_dir / "engine_logits.pt")
    recipe.close()
    leave(0)


class Launcher:
    """Starts the steps' processes, each in its own session, stopped whole at its step's deadline
    (or when this script is stopped); their output is kept in <out>/logs/."""

    def __init__(self, out: Path, ranks: int) -> None:
        self.logs, self.ranks, self.count = out / "logs", ranks, 0
        self.logs.mkdir(parents=True, exist_ok=True)

    def run(self, cmd: list, deadline: float, env: dict | None = None) -> subprocess.CompletedProcess:
        cmd = [str(c) for c in cmd]
        self.count += 1
        full_env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", **(env or {})}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            output = self._stop(proc)
            self._log(cmd, output)
            raise StepFailed(f"over the step's time limit: {' '.join(cmd)}", output) from None
        finally:
            if proc.poll() is None:  # this script stopped by a signal (the timeout around it)
                self._stop(proc)
        self._log(cmd, output)
        return subprocess.CompletedProcess(cmd, proc.returncode, output)

    @staticmethod
    def _stop(proc: subprocess.Popen) -> str:
        """SIGINT to the process group first, so that torchrun stops its ranks and pytest the ones
        it started (both start them in sessions of their own); SIGKILL to what is left 15 s later.
        Its output."""
        os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.communicate(timeout=15)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.communicate()[0]

    def _log(self, cmd: list[str], output: str) -> None:
        (self.logs / f"{self.count:02d}.log").write_text(" ".join(cmd) + "\n\n" + output)

    def launch(self, args: list, deadline: float, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """`args` (a script and its flags) on the check's ranks, under torchrun (a launcher
        tests/multirank/test_launchers.py shows equal to DeepSpeed's): one process that imports
        torch alone, where DeepSpeed's imports DeepSpeed twice, and a free port of its own for
        each launch (--standalone), as a killed launch's may not be free yet."""
        proc = self.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", self.ranks, *args], deadline, env)
        if check and proc.returncode != 0:
            raise StepFailed(f"failed ({proc.returncode}): {' '.join(proc.args)}", proc.stdout)
        return proc


def environment(mode: Mode) -> dict:
    """The accelerator DeepSpeed chose and what the checks need of the GPU."""
    import deepspeed
    import torch
    import transformers
    from deepspeed.accelerator import get_accelerator

    chosen = get_accelerator().device_name()
    line = {"accelerator": chosen, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
    if chosen != mode.device:
        raise StepFailed(f"DeepSpeed's accelerator is {chosen!r}, not {mode.device!r} (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}, "
                         f"torch.cuda.is_available()={torch.cuda.is_available()}): set DS_ACCELERATOR={mode.device}")
    if mode.device == "cpu":
        return {**line, "device": "cpu", "ranks": 2}
    gpus = torch.cuda.device_count()
    line.update(device=torch.cuda.get_device_name(0), gpus=gpus, ranks=min(gpus, 2), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                bf16=torch.cuda.is_bf16_supported(), nccl=str(torch.cuda.nccl.version()))
    if not line["bf16"]:
        raise StepFailed(f"{line['device']} has no bf16: the pipeline and speed steps train in bf16")
    return line


def equivalence(mode: Mode, out: Path, launcher: Launcher, deadline: float) -> dict:
    """The gpu test tier in pytest; its counts and what failed or skipped."""
    report = out / "gpu_tier.xml"
    report.unlink(missing_ok=True)  # an earlier run's
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider", "--basetemp", out / "pytest", "--junitxml", report, *mode.tier]
    proc = launcher.run(cmd, deadline, env={ON_CPU: "1"} if mode.device == "cpu" else None)
    if not report.exists():
        raise StepFailed(f"pytest wrote no report ({proc.returncode})", proc.stdout)
    cases = ElementTree.parse(report).getroot().iter("testcase")
    outcome = {"passed": [], "failed": [], "skipped": []}
    reasons = set()
    for case in cases:
        problem = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        outcome["passed" if problem is None else "skipped" if problem.tag == "skipped" else "failed"].append(case.get("name"))
        if problem is not None and problem.tag == "skipped":
            reasons.add(problem.get("message", ""))
    line = {"passed": len(outcome["passed"]), "failed": outcome["failed"], "skipped": len(outcome["skipped"]), "skip_reasons": sorted(reasons)}
    if proc.returncode != 0 or outcome["failed"] or outcome["skipped"] or not outcome["passed"]:
        raise StepFailed(f"the gpu tier: {json.dumps(line)}", proc.stdout)
    return line


def relative_diff(got, expected) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def reload_check(run_dir: Path, device: str, precision: str) -> dict:
    """Logits of both exports, loaded without DeepSpeed, against the engine's: export/merged with
    plain transformers, export/compressed through compressed-tensors (tests/helpers/compressed_io.py)."""
    import torch

    from dsee_scale.models import TASK_MODELS

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.compressed_io import load_compressed

    saved = torch.load(run_dir / "engine_logits.pt", weights_only=True)
    result = {}
    for name in ("merged", "compressed"):  # both in the exported dtype (decompressing replaces every parameter)
        folder = run_dir / "export" / name
        model = (TASK_MODELS["lm"].from_pretrained(folder) if name == "merged" else load_compressed(folder)).to(device).eval()
        with torch.no_grad():
            logits = model(input_ids=saved["input_ids"].to(device), attention_mask=saved["attention_mask"].to(device)).logits.float().cpu()
        diff, relative = (logits - saved["logits"]).abs().max().item(), relative_diff(logits, saved["logits"])
        # bf16: ZeRO-3's linear (matmul, then bias) and plain torch's round differently in every layer
        ok = diff <= TOLERANCE["fp32"] if precision == "fp32" else relative <= TOLERANCE["bf16"]
        result[name] = {"dtype": str(model.dtype), "max_abs_logit_diff": diff, "relative_l2_diff": relative, "ok": ok}
        del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def loss_diff(losses: dict[str, list[float]], reference: dict[str, list[float]]) -> float:
    """The largest relative difference between two runs' losses (inf if their stages or steps differ)."""
    if {k: len(v) for k, v in losses.items()} != {k: len(v) for k, v in reference.items()}:
        return float("inf")
    return max((abs(a - b) / abs(b) for k in reference for a, b in zip(losses[k], reference[k])), default=0.0)


def logged_losses(run_dir: Path) -> dict[str, list[float]]:
    """Each training step's loss as a run with --log_every 1 logged it (metrics.jsonl)."""
    losses: dict[str, list[float]] = {}
    for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if record.get("stage") in ("tune", "retune"):
            losses.setdefault(record["stage"], []).append(record["loss"])
    return losses


def pipeline(mode: Mode, out: Path, launcher: Launcher, deadline: float) -> dict:
    """The shipped Recipe through every stage, killed while it writes its last re-tune checkpoint
    and resumed from the one before; both exports of the resumed run reloaded. The killed run is
    the uninterrupted one: it logged every training step's loss before it died."""
    from dsee_scale.checkpoint import latest_tag
    from dsee_scale.faults import FAULT_ENV

    run = out / "pipeline"
    last, every = mode.retune_steps, mode.save_every
    flags = [*mode.pipeline, "--retune_steps", last, "--save_every", every, "--log_every", 1, "--stages", "tune,prune,retune,export,evaluate",
             "--prune.sparsity", 0.5, "--export_format", "compressed", "--output_dir", run]
    worker = ["scripts/gpu_check.py", "--worker", *flags]
    killed = launcher.launch([*worker, "--overwrite"], deadline, env={FAULT_ENV: f"kill_during_save:retune-{last}"}, check=False)
    latest = latest_tag(run / "checkpoints")
    if killed.returncode == 0 or (run / "summary.json").exists() or latest != f"retune-{last - every}":
        raise StepFailed(f"the run was to die writing checkpoint retune-{last}, leaving retune-{last - every} the latest: exit {killed.returncode}, latest {latest}", killed.stdout)
    uninterrupted = logged_losses(run)
    launcher.launch([*worker, "--resume"], deadline)
    summary = json.loads((run / "summary.json").read_text())
    line = {"model": flags[flags.index("--model") + 1], "killed_writing": f"retune-{last}", "resumed_from": latest,
            "resumed_loss_max_rel_diff": loss_diff(summary["losses"], uninterrupted), "losses_identical": summary["losses"] == uninterrupted,
            "reload": reload_check(run, mode.device, mode.precision), **{k: summary.get(k) for k in (
                "total_params", "trainable_params", "sparsity", "final_sparsity", "compressed_format", "generation", "losses", "timings", "wall_s", "peak_rss_mb_per_rank")},
            "bleu": summary.get("after", {}).get("bleu")}
    failures = [what for what, bad in (
        ("resumed losses", line["resumed_loss_max_rel_diff"] > TOLERANCE[mode.precision]),
        ("sparsity", abs((summary.get("sparsity") or 0) - 0.5) > 1e-3),
        ("whole-model generation", summary.get("generation") != "whole"),
        ("compressed export", summary.get("compressed_format") is None),
        *((f"{name} export reload", not r["ok"]) for name, r in line["reload"].items()),
    ) if bad]
    if failures:
        raise StepFailed(f"{', '.join(failures)}: {json.dumps(line)}")
    return line


def speed(mode: Mode, out: Path, launcher: Launcher, deadline: float) -> dict:
    """memory_worker.py's tokens/s and peak memory of each method, one launch each."""
    lines_file = out / "speed.jsonl"
    lines_file.unlink(missing_ok=True)
    errors = {}
    for method in SPEED_METHODS:
        config = ["--ds_config", mode.speed_configs[method]] if method in mode.speed_configs else []
        try:
            launcher.launch(["benchmarks/memory_worker.py", "--method", method, "--out", lines_file, *mode.speed, *config], deadline)
        except StepFailed as failure:  # the other methods still run
            errors[method] = f"{failure}\n{failure.output}"[-1500:]
    rows = {row["method"]: row for row in map(json.loads, lines_file.read_text().splitlines())} if lines_file.exists() else {}
    ratio = round(rows["dsee"]["tokens_per_s"] / rows["peft_lora"]["tokens_per_s"], 3) if {"dsee", "peft_lora"} <= set(rows) else None
    line = {"tokens_per_s": {m: r["tokens_per_s"] for m, r in rows.items()},
            "peak_device_mb": {m: max(r["peak_device_mb"]) if r["peak_device_mb"] else None for m, r in rows.items()},
            "peak_rss_mb": {m: max(r["peak_rss_mb_per_rank"]) for m, r in rows.items()},
            "trainable_params": {m: r["trainable_params"] for m, r in rows.items()}, "ds_config": {m: r["ds_config"] for m, r in rows.items()},
            "dsee_vs_peft_lora": ratio, "target_dsee_vs_peft_lora": SPEED_TARGET, "meets_target": ratio is not None and ratio >= SPEED_TARGET,
            "speed_flags": [str(f) for f in mode.speed]}
    if errors:
        raise StepFailed(f"{', '.join(errors)} failed: {json.dumps({**line, 'errors': errors})}")
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny models on 2 CPU ranks (the same code path)")
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--only", default=",".join(STEPS[1:]), help=f"steps after the environment's, comma-separated: {', '.join(STEPS[1:])}")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        return worker(rest)
    only = args.only.split(",")
    if set(only) - set(STEPS[1:]):
        p.error(f"--only: unknown steps {', '.join(sorted(set(only) - set(STEPS[1:])))}: choose from {', '.join(STEPS[1:])}")
    mode_name = "cpu" if args.cpu else "gpu"
    mode = MODES[mode_name]
    if args.cpu:  # DeepSpeed's CPU accelerator for this process and every one it starts, on a GPU machine too
        os.environ.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The timeout around this script stops it with SIGTERM: SystemExit unwinds through the
    # running launch, which kills its process group, and the step says it was stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("gpu_check: stopped by SIGTERM (the timeout around it?)"))
    host = {"run": time.strftime("%Y%m%dT%H%M%S"), "mode": mode_name}
    failed = False

    def emit(step: str, ok: bool, fields: dict) -> None:
        line = json.dumps({**host, "step": step, "ok": ok, **fields})
        print(line, flush=True)
        with open(out / "gpu_check.jsonl", "a") as f:
            f.write(line + "\n")

    tic = time.monotonic()
    try:
        env = environment(mode)
    except Exception as error:  # noqa: BLE001 - any failure here ends the check, with its line
        emit("environment", False, {"error": str(error), "wall_s": round(time.monotonic() - tic, 1)})
        sys.exit(1)
    host.update(device=env["device"], ranks=env["ranks"])
    emit("environment", True, {**env, "wall_s": round(time.monotonic() - tic, 1)})
    launcher = Launcher(out, env["ranks"])
    for step, run in (("equivalence", equivalence), ("pipeline", pipeline), ("speed", speed)):
        if step not in only:
            continue
        tic = time.monotonic()
        try:
            emit(step, True, {**run(mode, out, launcher, tic + mode.caps_s[step]), "wall_s": round(time.monotonic() - tic, 1)})
        except SystemExit:
            emit(step, False, {"error": "stopped by SIGTERM", "wall_s": round(time.monotonic() - tic, 1)})
            raise
        except Exception as error:  # noqa: BLE001 - a failed step gives its line; the next step runs
            failed = True
            emit(step, False, {"error": str(error), "output_tail": getattr(error, "output", ""), "wall_s": round(time.monotonic() - tic, 1)})
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
