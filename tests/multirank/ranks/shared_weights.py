"""Frozen weights in shared memory (zero.share_frozen_weights), 2 CPU ranks of one machine:
every frozen partitioned weight is shared and its file's name is gone; a rank's shard is its
slice of the file; DSEE steps give the losses of ZeRO-3's own fetch, bit for bit; a fetch is a view
of the file; an edit of a whole weight under gathered(modify=True) lands once, not once per rank; each rank's
edit_local_shard is seen by its peer; a forward under whole_model equals one with ZeRO-3's hooks;
LLaMA's linear layers, all whole once frozen weights are shared, run through torch's own linear
(zero.torch_linear_where_whole) to the same losses as ZeRO-3's re-fetching linear, bit for bit."""
import json
import sys
from pathlib import Path

import torch

from common import eval_batch, start, train_steps

from dsee_scale import DSEEConfig, apply_dsee, zero
from dsee_scale.engine import create_engine
from dsee_scale.models import build_model, tiny_config

rank, world, out, config = start(sys.argv[-1])


def engine_of(share: bool, kind: str = "gpt2"):
    torch.manual_seed(0)
    odd = {"n_embd": 33, "n_head": 3} if kind == "gpt2" else {"hidden_size": 36, "num_attention_heads": 3, "num_key_value_heads": 3}
    model = build_model(tiny_config(kind, vocab_size=129, **odd), "lm", ds_config=config)  # 129: odd sizes, padded shards
    apply_dsee(model, DSEEConfig(rank=4, nnz=8, support="magnitude"), ds_config=config)
    if kind == "gpt2":
        model.transformer.ln_f.bias.requires_grad_(True)  # trainable, partitioned: ln_f's fetch mixes shared and gathered weights
    return model, create_engine(model, config, lr=1e-2, share_frozen=share, hook_per_block=False)  # sharing alone: hooks per block are tests/multirank/ranks/block_hooks.py's


def whole(param: torch.Tensor) -> torch.Tensor:
    with zero.gathered([param]):
        return param.data.clone()


gathered_model, gathered_engine = engine_of(share=False)
gathered_losses = train_steps(gathered_engine, 3, "lm", rank, world)
gathered_engine.destroy()


def linear_layers(model) -> dict[str, int]:
    return {kind.__name__: sum(type(m) is kind for m in model.modules()) for kind in (torch.nn.Linear, zero.TorchLinear)}


def llama_run(share: bool) -> tuple[dict[str, int], list[float]]:
    """Linear layers by class, and the losses of 3 steps (the later ones depend on every gradient)."""
    model, engine = engine_of(share, "llama")
    losses = train_steps(engine, 3, "lm", rank, world)
    engine.destroy()
    return linear_layers(model), losses


llama_gathered, llama_shared = llama_run(share=False), llama_run(share=True)

model, engine = engine_of(share=True)
frozen = [p for p in model.parameters() if zero.is_partitioned(p) and not p.requires_grad and p.ds_numel > 1]
result = {
    "frozen": len(frozen), "shared": sum(map(zero.shares_memory, frozen)),
    "trainable_shared": sum(zero.shares_memory(p) for p in model.parameters() if p.requires_grad),
    "mixed_group": zero.shares_memory(model.transformer.ln_f.weight) and not zero.shares_memory(model.transformer.ln_f.bias),
    "shard_is_own_slice": all(p.ds_tensor.data_ptr() == p.ds_shared_whole.data_ptr() + rank * p.ds_tensor.numel() * p.ds_tensor.element_size() for p in frozen),
    "odd_sizes": sum(1 for p in frozen if p.ds_numel % world),
}
losses = train_steps(engine, 3, "lm", rank, world)
# this process's mappings of the weight files, after collectives since every rank unlinked its
# share of the names: all gone (tmpfs is RAM until unlinked)
result["mapped_files"] = [line.split(maxsplit=5)[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/dsee_weights_" in line]
result["losses_equal"] = losses == gathered_losses
result["linear_layers"] = {"gpt2_gathered": linear_layers(gathered_model), "gpt2_shared": linear_layers(model),
                           "llama_gathered": llama_gathered[0], "llama_shared": llama_shared[0]}
result["llama_losses"] = [llama_gathered[1], llama_shared[1]]
weight = model.transformer.h[0].mlp.c_fc.weight
before = whole(weight)
weight.all_gather_coalesced([weight]).wait()  # ZeRO-3's fetch, as its hooks call it: a view of the file
result["fetch_is_view"] = zero.is_whole(weight) and weight.data.data_ptr() == weight.ds_shared_whole.data_ptr()
with torch.no_grad(), zero.gathered([weight], modify=True):
    weight.data += 1.0  # every rank runs the edit; rank 0's is kept
result["modify_lands_once"] = torch.equal(whole(weight), before + 1.0)
zero.edit_local_shard(weight, lambda shard, _start: shard.fill_(float(rank + 7)))
# read straight from the file, where a peer reads it: each rank's slice holds that rank's edit
result["peer_edits_seen"] = [sorted(set(part.tolist())) for part in weight.ds_shared_whole.view(world, -1)]
engine.eval()
with torch.no_grad():
    hooked = engine(input_ids=eval_batch()).logits
    with zero.whole_model(engine):
        whole_logits = engine.module(input_ids=eval_batch()).logits
result["whole_model_equal"] = torch.equal(hooked, whole_logits)
if rank == 0:
    Path(out, "result.json").write_text(json.dumps(result))
