"""50% global magnitude pruning of a partitioned GPT-2 config on the ranks that launched it:
`distributed` (dsee_scale.prune on local shards) or `gather_rank0` (every selected weight
gathered to rank 0, torch.nn.utils.prune.global_unstructured there, masks scattered back).
Rank 0 appends one JSON line to --out."""
import argparse
import threading
import time

import torch
import torch.distributed as dist

from results_io import record

from dsee_scale import zero
from dsee_scale.config import PruneConfig
from dsee_scale.engine import init_distributed
from dsee_scale.models import build_model, builtin_config, tiny_config
from dsee_scale.prune import prune_unstructured, prune_targets, sparsity_report


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.base, self.peak, self.running = rss_mb(), rss_mb(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)

    def stop(self) -> float:
        self.running = False
        self.join()
        return max(self.peak, rss_mb()) - self.base


def gather_rank0(model, sparsity: float) -> None:
    from torch.nn.utils import prune as torch_prune

    defaults = PruneConfig()
    targets = prune_targets(model, defaults.include, defaults.exclude)
    holders = []
    for t in targets:
        with zero.gathered([t.param]):
            if dist.get_rank() == 0:
                holder = torch.nn.Module()
                holder.weight = torch.nn.Parameter(t.param.data.clone(), requires_grad=False)
                holders.append(holder)
    masks = []
    if dist.get_rank() == 0:
        torch_prune.global_unstructured([(h, "weight") for h in holders], pruning_method=torch_prune.L1Unstructured, amount=sparsity)
        masks = [h.weight_mask.bool() for h in holders]
        del holders
    for i, t in enumerate(targets):
        with zero.gathered([t.param], modify=True):
            if dist.get_rank() == 0:
                t.param.data.masked_fill_(~masks[i], 0)


p = argparse.ArgumentParser()
p.add_argument("--method", choices=["distributed", "gather_rank0"], required=True)
p.add_argument("--model", default="gpt2-xl")
p.add_argument("--sparsity", type=float, default=0.5)
p.add_argument("--out", required=True)
args, _ = p.parse_known_args()
init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
ds_config = zero.with_fetch_defaults({"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
config = tiny_config("gpt2", vocab_size=1000, n_embd=256, n_layer=4) if args.model == "tiny" else builtin_config(f"builtin:{args.model}")
model = build_model(config, "lm", ds_config=ds_config)
for p_ in model.parameters():
    p_.requires_grad = False
defaults = PruneConfig()
shard_mb = sum(zero.local_shard(t.param).numel() for t in prune_targets(model, defaults.include, defaults.exclude)) * 4 / 2**20
dist.barrier()
sampler = PeakSampler()
sampler.start()
tic = time.perf_counter()
if args.method == "distributed":
    prune_unstructured(model, args.sparsity)
else:
    gather_rank0(model, args.sparsity)
dist.barrier()
seconds = time.perf_counter() - tic
extra = sampler.stop()
report = sparsity_report(model)
gathered = [None] * world
dist.all_gather_object(gathered, {"extra": extra, "shard": shard_mb})
if rank == 0:
    line = {"method": args.method, "model": args.model, "world_size": world, "seconds": round(seconds, 2),
            "extra_peak_mb_per_rank": [round(g["extra"], 1) for g in gathered], "shard_mb_per_rank": [round(g["shard"], 1) for g in gathered],
            "selected_mb": round(report["numel"] * 4 / 2**20, 1), "sparsity": report["total"], "exact_k": report["zeros"] == round(args.sparsity * report["numel"])}
    record(line, args.out, echo=False)
dist.barrier()
