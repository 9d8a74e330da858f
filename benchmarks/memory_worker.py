"""One method on one 2-rank engine (ZeRO-3; ZeRO-2 for optimized_linear): per-rank peak RSS,
s/step, bytes moved per step.

Started by bench_memory.py under the deepspeed launcher; rank 0 appends one JSON line to --out.
`--method floor` is the compute floor of data parallelism instead: this rank's DSEE work in a
plain process (no DeepSpeed, no communication), started twice at once by bench_memory.py, one
core each; each process appends its own line. `--method optimized_linear` is the LoRA DeepSpeed
ships (`deepspeed.linear.OptimizedLinear`, base weights of the targets sharded by the layer
itself) on ZeRO-2, as its documentation pairs them: bf16 and LLaMA-shaped models only.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench_memory import cpu_columns
from results_io import record

from dsee_scale import DSEEConfig, apply_dsee, count_parameters, zero
from dsee_scale.arch import LLAMA_SIZES
from dsee_scale.baselines import apply_peft_lora
from dsee_scale.config import train_config_from_argv
from dsee_scale.engine import create_engine, init_distributed
from dsee_scale.models import builtin_config, build_model, tiny_config

ROOT = Path(__file__).resolve().parent.parent

# --model NAME: that recipe's model (a 2-label classifier), sequence length, batch and ds_config.
RECIPE_MODELS = {"minilm": "launch/recipes/minilm-sst2.yaml"}
# builtin LLaMA configs (models.builtin_config): tiny-llama for the GPU check's CPU mode, and the sizes
LLAMA_MODELS = ("tiny-llama", *LLAMA_SIZES)

# Self CPU time of torch ops, by kind: what is left of the step is Python (hooks, DeepSpeed's
# bookkeeping) and waiting outside an op.
PROFILE_KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention"),
    "communication": ("gloo", "c10d", "nccl", "all_gather", "allgather", "reduce_scatter", "all_reduce", "allreduce", "broadcast", "record_param_comms", "wait"),
    "memory": ("aten::copy_", "aten::cat", "aten::empty", "aten::zero_", "aten::fill_", "aten::narrow_copy", "aten::clone", "aten::_to_copy", "aten::resize_", "aten::set_", "aten::index", "aten::scatter"),
}


def write_profile(profiler, steps: int, s_per_step: float, path: str) -> None:
    events = profiler.key_averages()
    by_kind = dict.fromkeys([*PROFILE_KINDS, "other ops"], 0.0)
    for event in events:
        kind = next((k for k, names in PROFILE_KINDS.items() if any(n in event.key for n in names)), "other ops")
        by_kind[kind] += event.self_cpu_time_total / 1e6 / steps
    in_ops = sum(by_kind.values())
    by_kind["outside ops (Python, hooks, waits)"] = max(0.0, s_per_step - in_ops)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    Path(path).write_text(json.dumps({
        "s_per_step": round(s_per_step, 4), "s_per_step_by_kind": {k: round(v, 4) for k, v in by_kind.items()},
        "top_ops": [{"op": e.key, "calls_per_step": e.count / steps, "self_s_per_step": round(e.self_cpu_time_total / 1e6 / steps, 4)} for e in top],
    }, indent=1))


def apply_optimized_linear(model: torch.nn.Module, adapters: DSEEConfig, world: int) -> None:
    """What `deepspeed.linear.Init` + `from_pretrained` make of the targets (LoRA, base weight
    sharded over the ranks; every other weight frozen and whole). Done by hand: under
    `from_config` Init ignores target_mods and adapts every Linear, lm_head included."""
    from deepspeed.linear import LoRAConfig, OptimizedLinear

    lora = LoRAConfig(lora_r=adapters.rank, lora_alpha=adapters.alpha, base_weight_sharding=world, target_mods=adapters.targets)
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if child in adapters.targets:
            setattr(model.get_submodule(parent), child, OptimizedLinear(module.in_features, module.out_features, lora_config=lora, dtype=module.weight.dtype))


p = argparse.ArgumentParser()
p.add_argument("--method", choices=["full", "peft_lora", "dsee", "floor", "optimized_linear"], required=True)
p.add_argument("--model", default="gpt2-medium", help=f"builtin GPT-2 or LLaMA size, 'tiny' (GPT-2), 'tiny-llama', or one of {', '.join(RECIPE_MODELS)}: its recipe's model and setting")
p.add_argument("--seq", type=int, default=None, help="default: 128, or the recipe's max_length")
p.add_argument("--batch", type=int, default=None, help="micro-batch per rank; default: 2, or the recipe's")
p.add_argument("--steps", type=int, default=10)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--bf16", action="store_true", help="bf16 weights and compute (GPUs; CPUs with AVX-512 bf16)")
p.add_argument("--no_comms_log", action="store_true", help="time without DeepSpeed's comms logger (it synchronises the device after every collective); traffic is then not reported")
p.add_argument("--ds_config", help="the engine's DeepSpeed config file (batch, precision and logging set here); default: the recipe's, or the shipped default ds_configs/zero3.json (zero2.json for optimized_linear)")
p.add_argument("--profile", help="write where rank 0's timed steps spend their time (torch.profiler, self CPU time by kind of op) to this JSON file")
p.add_argument("--no_share_frozen_weights", action="store_true", help="ZeRO-3 gathers frozen weights at every use, as without dsee_scale's shared-memory weights (create_engine's share_frozen)")
p.add_argument("--no_hook_per_block", action="store_true", help="ZeRO-3 hooks every layer, not each transformer block as a whole (create_engine's hook_per_block)")
p.add_argument("--out", required=True)
args, _ = p.parse_known_args()
if args.method == "optimized_linear" and not (args.bf16 and args.model in LLAMA_MODELS):
    sys.exit(f"--method optimized_linear needs --bf16 and a LLaMA model ({', '.join(LLAMA_MODELS)}): deepspeed.linear builds its layers "
             "in bf16 whatever the model's dtype, and replaces nn.Linear only (not GPT-2's Conv1D)")
recipe = train_config_from_argv(["--config", RECIPE_MODELS[args.model]]) if args.model in RECIPE_MODELS else None
args.seq = args.seq or (recipe.max_length if recipe else 128)
args.batch = args.batch or (recipe.micro_batch_size if recipe else 2)
config_file = Path(args.ds_config or (recipe.ds_config if recipe else None) or f"ds_configs/zero{2 if args.method == 'optimized_linear' else 3}.json")  # the CPU defaults; --bf16 sets the precision
if not (config_file.is_absolute() or config_file.exists()):  # recipes name it from the repository root
    config_file = ROOT / config_file
file_config = json.loads(config_file.read_text())
clip = float(file_config.get("gradient_clipping") or 0)  # the floor clips as the engine does

floor = args.method == "floor"
if floor:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
else:
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
ds_config = None if floor else zero.with_fetch_defaults({
    **file_config, "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1, "train_batch_size": args.batch * world, "steps_per_print": 10**9,
    "comms_logger": {"enabled": not args.no_comms_log, "verbose": False, "prof_all": True, "debug": False}, "bf16": {"enabled": args.bf16},
})
config_name = os.path.relpath(config_file.absolute(), ROOT)  # not resolve(): ds_configs/ is a link into the package
dtype = torch.bfloat16 if args.bf16 else torch.float32
if recipe:
    model = build_model(recipe.model, recipe.task, ds_config=ds_config, dtype=dtype, num_labels=2)
    config, targets = model.config, recipe.dsee.targets
elif args.model in LLAMA_MODELS:  # GPT-2's vocabulary (llama-7b keeps its own)
    config, targets = builtin_config(f"builtin:{args.model}", vocab_size=50257), ["q_proj", "v_proj"]
    model = build_model(config, "lm", ds_config=None if args.method == "optimized_linear" else ds_config, dtype=dtype)
else:
    config = tiny_config("gpt2", vocab_size=1000, n_embd=128, n_positions=args.seq) if args.model == "tiny" else builtin_config(f"builtin:{args.model}")
    config.n_positions = max(config.n_positions, args.seq)
    model = build_model(config, "lm", ds_config=ds_config, dtype=dtype)
    targets = ["c_attn:q,v"]
# PEFT LoRA as the recipes' `--method peft_lora` applies it: on whole modules, so on all of GPT-2's
# fused c_attn, which at the same rank has DSEE's trainable budget on its q and v slices.
adapters = DSEEConfig(rank=args.rank, alpha=2.0 * args.rank, nnz=64, targets=targets, support="magnitude")
if args.method in ("dsee", "floor"):
    apply_dsee(model, adapters, ds_config=ds_config)
elif args.method == "peft_lora":
    apply_peft_lora(model, adapters)
elif args.method == "optimized_linear":
    apply_optimized_linear(model, adapters, world)
trainable, total = count_parameters(model)
if args.method == "optimized_linear":  # count_parameters sees this rank's shard of each sharded base weight
    from deepspeed.linear.optimized_linear import LoRAOptimizedLinear

    total += sum(m.input_dim * m.output_dim - m.weight.numel() for m in model.modules() if isinstance(m, LoRAOptimizedLinear))
if floor:
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable_params, lr=1e-4)
else:
    engine = create_engine(model, ds_config, lr=1e-4, share_frozen=not args.no_share_frozen_weights, hook_per_block=not args.no_hook_per_block)
generator = torch.Generator().manual_seed(rank)
times = []
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.comm import comm as ds_comm  # noqa: E402
from deepspeed.utils import z3_leaf_module  # noqa: E402

accelerator = get_accelerator()

profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.profile and rank == 0 else None
for step in range(args.warmup + args.steps):
    if step == args.warmup:
        ds_comm.comms_logger.comms_dict.clear()
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        if profiler:
            profiler.start()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator)
    labels = torch.randint(0, 2, (args.batch,), generator=generator) if recipe else ids
    accelerator.synchronize()
    tic = time.perf_counter()
    if floor:
        model(input_ids=ids, labels=labels).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable_params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        engine.backward(engine(input_ids=ids.to(engine.device), labels=labels.to(engine.device)).loss)
        engine.step()
    accelerator.synchronize()  # GPU work is asynchronous: the step ends when the device is done
    if step >= args.warmup:
        times.append(time.perf_counter() - tic)
usage = resource.getrusage(resource.RUSAGE_SELF)
# where a step's time goes besides computing: the kernel (page faults of fresh allocations, copies
# through sockets and shared memory) and faults themselves, per timed step, this process's threads
cpu = {"user_s": (usage.ru_utime - usage_before.ru_utime) / args.steps, "sys_s": (usage.ru_stime - usage_before.ru_stime) / args.steps,
       "minor_faults": (usage.ru_minflt - usage_before.ru_minflt) / args.steps}
if profiler:
    profiler.stop()
    write_profile(profiler, args.steps, sum(times) / len(times), args.profile)


def bytes_per_step(name_part: str) -> float:
    total_bytes = sum(size * record[0] for op, sizes in ds_comm.comms_logger.comms_dict.items() if name_part in op for size, record in sizes.items())
    return total_bytes / args.steps


def shared_mb() -> float:
    """What this process's RSS counts of memory it shares with its peers, less its share of it
    (Rss - Pss): weights in /dev/shm, shared-memory buffers, library code. They are mapped and
    read from the first step on, so peak RSS less this is the peak proportional set size: the
    process's memory with shared pages split between their users, which sums to the machine's."""
    fields = dict(line.split()[:2] for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return (int(fields["Rss:"]) - int(fields["Pss:"])) / 1024


peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
peak_pss_mb = peak_mb - shared_mb()
if floor:  # no process group: this process's own line
    record({"method": "floor", "rank": rank, "peak_mb": round(peak_mb, 1), "peak_pss_mb": round(peak_pss_mb, 1), "s_per_step": statistics.median(times), "params": total,
            "trainable_params": trainable, "seq": args.seq, "micro_batch": args.batch, "model": args.model, "ds_config": config_name, "gradient_clipping": clip, "cpu": cpu},
           args.out, echo=False)
    sys.exit(0)
gathered = [None] * world
on_device = accelerator.device_name() != "cpu"
peak_device_mb = accelerator.max_memory_allocated() / 2**20 if on_device else None
dist.all_gather_object(gathered, {"peak_mb": peak_mb, "peak_pss_mb": peak_pss_mb, "peak_device_mb": peak_device_mb, "s_per_step": statistics.median(times), "cpu": cpu, "all_gather": bytes_per_step("all_gather"), "reduce_scatter": bytes_per_step("reduce_scatter"),
                                "reduce": bytes_per_step("reduce")})
if rank == 0:
    line = {
        "method": args.method, "model": args.model, "params": total, "trainable_params": trainable, "world_size": world, "seq": args.seq, "micro_batch": args.batch,
        "peak_rss_mb_per_rank": [round(g["peak_mb"], 1) for g in gathered],
        "peak_pss_mb_per_rank": [round(g["peak_pss_mb"], 1) for g in gathered],
        "share_frozen_weights": not args.no_share_frozen_weights, "hook_per_block": not args.no_hook_per_block, "shared_frozen_weights": sum(map(zero.shares_memory, model.parameters())),
        "z3_leaf_modules": sum(map(z3_leaf_module, model.modules())), "ds_config": config_name, "gradient_clipping": clip,  # leaf modules: blocks hooked whole
        "s_per_step": round(max(g["s_per_step"] for g in gathered), 4),
        **cpu_columns(gathered),
        "tokens_per_s": round(world * args.batch * args.seq / max(g["s_per_step"] for g in gathered), 1),
        "peak_device_mb": [round(g["peak_device_mb"], 1) for g in gathered] if on_device else None, "bf16": args.bf16,
        "all_gather_mb_per_step": None if args.no_comms_log else round(gathered[0]["all_gather"] / 2**20, 2),
        "reduce_scatter_mb_per_step": None if args.no_comms_log else round(gathered[0]["reduce_scatter"] / 2**20, 3),
        # every reduction (ZeRO-2 reduces gradients with all-reduce or reduce, ZeRO-3 with reduce-scatter)
        "reductions_mb_per_step": None if args.no_comms_log else round(gathered[0]["reduce"] / 2**20, 3),
    }
    record(line, args.out, echo=False)
dist.barrier()
# joins the process group's threads before exit: left to interpreter shutdown, a rank now and then
# aborted there ("terminate called without an active exception", 2 of ~40 launches on 2026-12-02)
dist.destroy_process_group()
