"""2-rank ZeRO-3 DSEE training of a tiny model; writes what the tests check to --out. Batches go
to the engine's device: the CPU tier runs it on CPU ranks, the gpu tier (tests/gpu) on GPUs.

Run under any launcher, e.g. `deepspeed --num_gpus 2 tests/multirank/ranks/zero3_tiny.py --base DIR --out DIR`.
"""
import argparse
import json

import torch
import torch.distributed as dist

from common import ZERO3_DSEE, batch, eval_batch, param_collectives, shard, start

from safetensors.torch import save_file

from dsee_scale import apply_dsee, count_parameters, dsee_layers, support_of
from dsee_scale import zero
from dsee_scale.engine import create_engine, optimizer_state_numel
from dsee_scale.export import export_hf, save_adapter
from dsee_scale.inject import adapter_parameters
from dsee_scale.models import build_model

p = argparse.ArgumentParser()
p.add_argument("--base", required=True, help="pretrained model folder, or config:tiny-gpt2 / config:gpt2-small for random init")
p.add_argument("--task", default="lm")
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--start", type=int, default=0, help="first step (with --resume)")
p.add_argument("--resume", help="checkpoint folder to load first")
p.add_argument("--save", help="write a full checkpoint here after the last step")
p.add_argument("--export", action="store_true", help="export the merged model as an HF folder")
p.add_argument("--persistence", type=int, default=0, help="stage3_param_persistence_threshold: parameters DeepSpeed itself keeps whole")
p.add_argument("--bf16", action="store_true", help="bf16 weights and compute (DeepSpeed's bf16 mode: fp32 master copies of the adapters)")
args, _ = p.parse_known_args()  # launchers may add --local_rank

rank, world, out, config = start(args.out)
config["zero_optimization"]["stage3_param_persistence_threshold"] = args.persistence
config["bf16"] = {"enabled": args.bf16}
if args.base.startswith("config:"):
    from transformers import GPT2Config

    from dsee_scale.models import tiny_config

    source = GPT2Config() if args.base == "config:gpt2-small" else tiny_config("gpt2", vocab_size=1000, n_embd=64)
else:
    source = args.base
model = build_model(source, args.task, ds_config=config, dtype=torch.bfloat16 if args.bf16 else torch.float32)
apply_dsee(model, ZERO3_DSEE, ds_config=config)
save_file({k: v.contiguous() for k, v in support_of(model).items()}, str(out / f"support_rank{rank}.safetensors"))
engine = create_engine(model, config, lr=1e-2)
if args.resume:
    engine.load_checkpoint(args.resume)

frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
frozen_sum = lambda: float(sum(zero.local_shard(p).double().sum() for p in frozen))  # noqa: E731
report = {"world": world, "frozen_checksum_before": frozen_sum(), "losses": [], "vocab": model.config.vocab_size}
for step in range(args.start, args.start + args.steps):
    b = shard(batch(step, args.task), rank, world, engine.device)
    loss = engine(**b).loss
    engine.backward(loss)
    if step == args.start:  # persistent parameters (adapters, DeepSpeed's own) are gathered again after the step: one collective
        report["param_collectives_in_step"] = param_collectives(engine.step)
        report["adapter_tensors"] = len(adapter_parameters(model))
    else:
        engine.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    report["losses"].append(mean.item() / world)
    if step == args.start:
        report["shard_numel_during"] = {n: zero.local_shard(p).numel() for n, p in model.named_parameters() if not p.requires_grad}

report["frozen_checksum_after"] = frozen_sum()
report["shard_numel_after"] = {n: zero.local_shard(p).numel() for n, p in model.named_parameters() if not p.requires_grad}
report["full_numel"] = {n: zero.full_numel(p) for n, p in model.named_parameters() if not p.requires_grad}
report["adapters_whole"] = all(zero.is_whole(p) for layer in dsee_layers(model).values() for p in (layer.lora_A, layer.lora_B, layer.sparse_values))
report["optimizer_state_numel"] = optimizer_state_numel(engine)
report["trainable"], report["total"] = count_parameters(model)
report["frozen_grads"] = sum(1 for p in frozen if p.grad is not None)
report["dtypes"] = sorted({str(zero.full_dtype(p)) for p in model.parameters()})
from deepspeed.accelerator import get_accelerator  # noqa: E402

accelerator = get_accelerator()
report["accelerator"] = {"fp16": bool(accelerator.is_fp16_supported()), "bf16": bool(accelerator.is_bf16_supported())}
if args.save:
    engine.save_checkpoint(args.save)
    engine.save_checkpoint(args.save + "_adapter_only", exclude_frozen_parameters=True)
save_adapter(model, out / "adapter", ZERO3_DSEE)
engine.eval()
with torch.no_grad():
    logits = engine(input_ids=eval_batch().to(engine.device)).logits
if args.export:
    export_hf(model, out / "hf", merge=True)
if rank == 0:
    torch.save(logits.float().cpu(), out / "logits.pt")  # read by a test process pinned to the CPU
(out / f"report_rank{rank}.json").write_text(json.dumps(report))
dist.barrier()
