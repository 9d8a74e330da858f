"""2-rank ZeRO-3, one family end to end: DSEE injected, an exact global prune (masks to --out),
then on a fresh model: silence 2 heads (a whole KV group where KV heads are grouped) and 7
neurons per layer, remove them, check the logits, re-tune, export, and the engine's logits."""
import argparse
import json

import torch
import torch.distributed as dist

from common import batch, eval_batch, full_masks, shard, start

from dsee_scale import DSEEConfig, apply_dsee, dsee_layers, zero
from dsee_scale.engine import create_engine
from dsee_scale.export import export_hf
from dsee_scale.layer import weight_is_transposed
from dsee_scale.models import build_model
from dsee_scale.prune import prune_unstructured
from dsee_scale.structured import attention_layers, ffn_layers, remove

DSEE = DSEEConfig(rank=4, nnz=16, init="normal", support="magnitude")

p = argparse.ArgumentParser()
p.add_argument("--base", required=True)
p.add_argument("--task", default="lm")
p.add_argument("--out", required=True)
args, _ = p.parse_known_args()
rank, world, out, config = start(args.out)


def fresh_model():
    return apply_dsee(build_model(args.base, args.task, ds_config=config), DSEE, ds_config=config)


masks = full_masks(prune_unstructured(fresh_model(), 0.5, score="merged"))
model = fresh_model()
adapted = {name: layer.slices for name, layer in dsee_layers(model).items()}
first = attention_layers(model)[0]
silent_heads = slice(0, 2) if first.kv_heads < first.heads else slice(1, 3)  # grouped KV heads: group 0 = heads 0, 1
with torch.no_grad():
    for attn, ffn in zip(attention_layers(model), ffn_layers(model)):
        heads = slice(silent_heads.start * attn.head_dim, silent_heads.stop * attn.head_dim)
        for module, cols in ((attn.o, heads), (ffn.down, slice(0, 7))):
            base = getattr(module, "base", module)
            with zero.gathered([base.weight], modify=True):
                (base.weight[cols, :] if weight_is_transposed(base) else base.weight[:, cols]).zero_()
engine = create_engine(model, config, lr=1e-2)
engine.eval()
with torch.no_grad():
    before = engine(input_ids=eval_batch()).logits
engine.destroy()
keep_heads = [torch.tensor([h for h in range(a.heads) if not silent_heads.start <= h < silent_heads.stop]) for a in attention_layers(model)]
keep_neurons = [torch.arange(7, f.size) for f in ffn_layers(model)]
remove(model, keep_heads, keep_neurons, config)
engine = create_engine(model, config, lr=1e-2)
engine.eval()
with torch.no_grad():
    after = engine(input_ids=eval_batch()).logits
engine.train()
losses = []
for step in range(10):
    loss = engine(**shard(batch(step % 2, args.task), rank, world)).loss
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
partitioned = all(zero.is_partitioned(p) for p in model.parameters())
engine.eval()
with torch.no_grad():
    logits = engine(input_ids=eval_batch()).logits
export_hf(model, out / "hf", merge=True)
if rank == 0:
    report = {"max_logit_diff": (after - before).abs().max().item(), "heads": [a.heads for a in attention_layers(model)], "ffn": [f.size for f in ffn_layers(model)],
              "retune_losses": losses, "shards_partitioned": partitioned, "adapted": adapted, "dsee": DSEE.to_dict()}
    (out / "report.json").write_text(json.dumps(report))
    torch.save({"masks": masks, "logits": logits}, out / "tensors.pt")
dist.barrier()
