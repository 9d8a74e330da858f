"""The 2:4 SparseGPT re-fit of a partitioned builtin config (GPT-2-medium unless --model; random
init, DSEE adapters, keep_sparse) on the ranks that launched it, timed spread over the ranks
(`refit`'s default) and on rank 0 alone (spread=False, the schedule before the spread),
alternating spread / alone / alone / spread ... after an untimed warm-up of each on the first
block, so load on a shared machine falls on both alike. With --nvme the frozen shards live on disk
(ds_configs/zero3_nvme.json's offload_param, a swap folder per rank under --nvme, removed at the
end): each fit reads its matrix from there and writes its rows back. Rank 0 appends one JSON line
to --out."""
import argparse
import importlib
import json
import os
import shutil
import statistics
import time

import torch
import torch.distributed as dist

from results_io import record

from dsee_scale import DSEEConfig, apply_dsee, zero
from dsee_scale.config import PruneConfig
from dsee_scale.ds_config import check_nvme_buffers, check_nvme_offload, resolve_ds_config
from dsee_scale.engine import create_engine, init_distributed
from dsee_scale.models import TASK_MODELS, build_model, builtin_config
from dsee_scale.prune import prune_targets

refit_module = importlib.import_module("dsee_scale.prune.refit")  # the module: the package exports its refit function by that name

p = argparse.ArgumentParser()
p.add_argument("--model", default="builtin:gpt2-medium")
p.add_argument("--layers", type=int, help="keep only the first N blocks (same matrix shapes, a shorter run)")
p.add_argument("--batches", type=int, default=2, help="calibration micro-batches per rank")
p.add_argument("--tokens", type=int, default=128, help="tokens per calibration row (one row per micro-batch)")
p.add_argument("--repeats", type=int, default=1, help="spread/alone/alone/spread cycles")
p.add_argument("--nvme", help="a folder on a local disk: the frozen shards swapped there (ds_configs/zero3_nvme.json), not kept in memory")
p.add_argument("--out", required=True)
args, _ = p.parse_known_args()
init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
config = builtin_config(args.model)
if args.layers:
    config.num_hidden_layers = args.layers  # GPT-2 maps it to n_layer
ds_config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
if args.nvme:
    name, file = resolve_ds_config("zero3_nvme")
    nvme = json.loads(file.read_text())
    ds_config["zero_optimization"] = {**nvme["zero_optimization"], "offload_param": {**nvme["zero_optimization"]["offload_param"], "nvme_path": f"{args.nvme}/rank{rank}"}}
    ds_config["aio"] = nvme["aio"]
    check_nvme_offload(ds_config, f"{name} with nvme_path {args.nvme}")  # this folder writable, libaio there
    with torch.device("meta"):
        check_nvme_buffers(ds_config, TASK_MODELS["lm"].from_config(config), world)  # resolves buffer_size "auto"
ds_config = zero.with_fetch_defaults(ds_config)
model = apply_dsee(build_model(config, "lm", ds_config=ds_config), DSEEConfig(rank=8, nnz=64, support="magnitude", init="normal"), ds_config=ds_config)
engine = create_engine(model, ds_config, lr=1e-4)
engine.eval()
g = torch.Generator().manual_seed(100 + rank)
batches = [{"input_ids": torch.randint(0, config.vocab_size, (1, args.tokens), generator=g).to(engine.device)} for _ in range(args.batches)]
forward = lambda b: engine(**b)  # noqa: E731
targets = prune_targets(model, PruneConfig().include, PruneConfig().exclude)

grams_s = [0.0]
input_grams = refit_module.input_grams


def timed_grams(*a, **kw):
    tic = time.perf_counter()
    try:
        return input_grams(*a, **kw)
    finally:
        grams_s[0] += time.perf_counter() - tic


refit_module.input_grams = timed_grams
for spread in (True, False):  # warm-up, untimed: the first block's matrices, each way
    refit_module.refit(targets[:4], {}, (batches, forward), keep_sparse=True, nm=(2, 4), spread=spread)
times = {True: [], False: []}
for spread in [True, False, False, True] * args.repeats:
    dist.barrier()
    grams_s[0] = 0.0
    tic = time.perf_counter()
    refit_module.refit(targets, {}, (batches, forward), keep_sparse=True, nm=(2, 4), spread=spread)
    dist.barrier()
    times[spread].append((time.perf_counter() - tic, grams_s[0]))
if rank == 0:
    best = {s: min(t for t, _ in times[s]) for s in times}
    fit = {s: min(t - g for t, g in times[s]) for s in times}
    line = {"model": args.model, "layers": config.num_hidden_layers, "frozen_shards": "nvme" if args.nvme else "memory", "on_nvme": zero.on_nvme_count(model), "matrices": len(targets), "world_size": world, "calibration_tokens_per_rank": args.batches * args.tokens,
            "spread_s": [round(t, 1) for t, _ in times[True]], "rank0_alone_s": [round(t, 1) for t, _ in times[False]],
            "grams_s": [round(g, 1) for s in (True, False) for _, g in times[s]],
            "speedup_best": round(best[False] / best[True], 3), "speedup_mean": round(statistics.mean(t for t, _ in times[False]) / statistics.mean(t for t, _ in times[True]), 3),
            "speedup_fits_only_best": round(fit[False] / fit[True], 3),
            "cpu_cores": os.cpu_count(), "load_1min_after": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d")}
    record(line, args.out, echo=False)
dist.barrier()
if args.nvme:
    shutil.rmtree(f"{args.nvme}/rank{rank}", ignore_errors=True)
