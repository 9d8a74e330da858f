"""ZeRO-Infinity on this box: a LLaMA-7B-shaped model (6.7B parameters, 27 GB in fp32, more than
the box's 24 GiB) with its frozen weights on NVMe, through launch/train.py on 2 CPU ranks:
build straight to NVMe, Ω, 2 tuning steps at seq 64, 50% global prune of the NVMe-resident shards,
1 re-tune step, adapter-only export (launch/recipes/llama7b-nvme-cpu-smoke.yaml).

    python benchmarks/bench_infinity.py        # prints one JSON line

Disk use is sampled every 5 s in the swap folder (offload_param.nvme_path). Appends the line to
benchmarks/results/infinity.jsonl (or --out).
"""
import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from bench_gpt2xl import ROOT, run
from results_io import add_out, record

RECIPE = "launch/recipes/llama7b-nvme-cpu-smoke.yaml"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out(p, "infinity")
    p.add_argument("--output_dir", default=None, help="run folder (default: a temporary one)")
    args, extra = p.parse_known_args()
    swap = Path(json.loads((ROOT / "ds_configs" / "zero3_nvme.json").read_text())["zero_optimization"]["offload_param"]["nvme_path"])
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(5.0):
            peak[0] = max(peak[0], folder_bytes(swap))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    line = run(Path(args.output_dir or tempfile.mkdtemp()) / "run", extra, recipe=RECIPE, what="llama7b_nvme_smoke")
    done.set()
    sampler.join()
    line.update(disk_gb=round(peak[0] / 1e9, 2), s_per_step=line["step_s"], recipe=RECIPE, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    record(line, args.out)


if __name__ == "__main__":
    main()
