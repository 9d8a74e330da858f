"""Choose Ω for every q and v matrix of a GPT-2-XL-sized config (48 layers × 2 matrices of
1600 × 1600, random init like the model) on however many ranks launched it."""
import argparse
import time

import torch

from results_io import record

from dsee_scale import dist
from dsee_scale.support import SupportJob, choose_supports

p = argparse.ArgumentParser()
p.add_argument("--matrices", type=int, default=96)
p.add_argument("--dim", type=int, default=1600)
p.add_argument("--method", default="grebsmo")
p.add_argument("--out", required=True)
args, _ = p.parse_known_args()
if "RANK" in __import__("os").environ:
    from dsee_scale.engine import init_distributed

    init_distributed()
torch.set_num_threads(1)
jobs = [SupportJob(f"h.{i // 2}.attn.{'qv'[i % 2]}", torch.randn(args.dim, args.dim, generator=torch.Generator().manual_seed(i)) * 0.02, False, (0, args.dim)) for i in range(args.matrices)]
dist.barrier()
tic = time.perf_counter()
supports = choose_supports(jobs, 64, args.method, seed=0)
seconds = time.perf_counter() - tic
digest = int(sum(int(v.sum()) * (i + 1) for i, v in enumerate(supports.values())))
if dist.is_main():
    record({"what": "gpt2xl_total", "impl": "ours", "method": args.method, "world_size": dist.world_size(), "matrices": args.matrices, "dim": args.dim, "seconds": round(seconds, 2), "digest": digest},
           args.out, echo=False)
