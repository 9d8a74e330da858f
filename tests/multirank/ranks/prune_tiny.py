"""2-rank ZeRO-3 pruning of tiny models: writes full masks (rank 0) and zero-checks to --out.
Batches go to the engine's device and what is written to the CPU: the CPU tier runs it on CPU
ranks, the gpu tier (tests/gpu) on GPU shards."""
import argparse
import importlib
import json

import torch
import torch.distributed as dist

from common import batch, full_masks, shard, start

from dsee_scale import DSEEConfig, apply_dsee, zero
from dsee_scale import dist as dist_helpers
from dsee_scale.engine import create_engine
from dsee_scale.models import build_model
from dsee_scale.config import PruneConfig
from dsee_scale.prune import input_norms, prune_unstructured, prune_nm, prune_targets, reapply_masks, sparsity_report

p = argparse.ArgumentParser()
p.add_argument("--base", required=True)
p.add_argument("--task", default="lm")
p.add_argument("--out", required=True)
p.add_argument("--retune", type=int, default=0, help="after a 50%% global prune: re-tune steps, then save")
p.add_argument("--resume", help="load this checkpoint and only check the zeros")
args, _ = p.parse_known_args()

rank, world, out, config = start(args.out)
DSEE = DSEEConfig(rank=4, alpha=8.0, nnz=8, support="magnitude", init="normal")


def fresh_model():
    model = build_model(args.base, args.task, ds_config=config)
    return apply_dsee(model, DSEE, ds_config=config)


if args.retune or args.resume:
    model = fresh_model()
    engine = create_engine(model, config, lr=1e-2)
    masks = prune_unstructured(model, 0.5)
    if args.resume:
        engine.load_checkpoint(args.resume)
        reapply_masks(model, masks)  # masks recomputed from the same weights: same positions
    for step in range(args.retune):
        loss = engine(**shard(batch(step, args.task), rank, world, engine.device)).loss
        engine.backward(loss)
        engine.step()
    params = {n.replace(".base.", "."): p for n, p in model.named_parameters()}
    still_zero = all(bool((zero.local_shard(params[n])[m.dense()] == 0).all()) for n, m in masks.items())
    pruned = sum(int(m.dense().sum()) for m in masks.values())
    if args.retune:
        engine.save_checkpoint(str(out / "ckpt"))
    report = {"still_zero": still_zero, "pruned_local": pruned, "sparsity": sparsity_report(model)["total"]}
    (out / f"retune_rank{rank}.json").write_text(json.dumps(report))
else:
    results = {}
    # rows straddle the shards: Wanda's per row, and at OWL's block sparsities (M = 2: a tiny
    # random model's blocks differ in scores above twice their mean, rarely above 5 times)
    for scope, score, sparsity, options in [("global", "weight", 0.1, {}), ("global", "weight", 0.5, {}), ("global", "weight", 0.9, {}), ("layer", "weight", 0.5, {}),
                                            ("global", "merged", 0.5, {}), ("global", "delta", 0.5, {}), ("row", "merged", 0.3, {}),
                                            ("owl", "weight", 0.5, {"owl_m": 2.0, "owl_lambda": 0.1})]:
        model = fresh_model()
        masks = full_masks(prune_unstructured(model, sparsity, scope=scope, score=score, scope_options=options))
        report = sparsity_report(model)
        results[f"{scope}-{score}-{sparsity}"] = {"masks": masks, "zeros": report["zeros"], "numel": report["numel"], "options": options}
    for score in ("weight", "merged"):
        model = fresh_model()
        masks = full_masks(prune_nm(model, "2:4", score=score))
        report = sparsity_report(model)
        results[f"pattern-{score}-2:4"] = {"masks": masks, "zeros": report["zeros"], "numel": report["numel"]}
    # The activation score: input norms from each rank's half of the calibration batches, through
    # the engine's forward (ZeRO-3 fetches), all-reduced; padded rows on rank 1.
    calibration = [batch(100 + i, args.task) for i in range(2)]
    for b in calibration:
        b["attention_mask"] = torch.ones_like(b["input_ids"])
        b["attention_mask"][-1, 5:] = 0
    for key, prune in [("global-activation-0.5", lambda m, c: prune_unstructured(m, 0.5, score="activation", calibration=c)),
                       ("pattern-activation-2:4", lambda m, c: prune_nm(m, "2:4", score="activation", calibration=c))]:
        model = fresh_model()
        engine = create_engine(model, config, lr=1e-2)
        engine.eval()
        mine = ([shard(b, rank, world, engine.device) for b in calibration], lambda b: engine(**b))
        targets = prune_targets(model, PruneConfig().include, PruneConfig().exclude)
        input_norms(targets, *mine)  # what pruning computes inside, kept for the test's reference
        masks = full_masks(prune(model, mine))
        norms = {t.name: t.input_norm.cpu() for t in targets}
        report = sparsity_report(model)
        results[key] = {"masks": masks, "zeros": report["zeros"], "numel": report["numel"], "norms": norms, "calibration": calibration}
        engine.destroy()
    # Reconstruction: the grams all-reduced over the ranks' halves, each matrix re-fitted whole by
    # the rank that fit_rounds gives it; and again with every matrix on rank 0 (spread=False).
    refit_module = importlib.import_module("dsee_scale.prune.refit")  # the module (the package exports its refit function by that name)
    fits = []  # one entry per matrix this rank fitted
    refit_module.obs_reconstruct = lambda *a, _fit=refit_module.obs_reconstruct, **kw: fits.append(1) or _fit(*a, **kw)
    reconstructed, chosen = {}, {}
    for spread in (True, False):
        model = fresh_model()
        engine = create_engine(model, config, lr=1e-2)
        engine.eval()
        mine = ([shard(b, rank, world, engine.device) for b in calibration], lambda b: engine(**b))
        if spread:
            masks = prune_nm(model, "2:4", score="activation", calibration=mine, reconstruct=True)
            fitted_here = len(fits)
        else:  # what prune_nm does with reconstruct, through refit's baseline switch
            masks = {}
            refit_module.refit(prune_targets(model, PruneConfig().include, PruneConfig().exclude), masks, mine, keep_sparse=True, nm=(2, 4), spread=False)
        weights = {}
        for t in prune_targets(model, PruneConfig().include, PruneConfig().exclude):
            with zero.gathered([t.param]):
                weights[t.name] = t.param.detach().to("cpu", copy=True)  # a copy: the gathered memory is released after
        reconstructed[spread], chosen[spread] = weights, full_masks(masks)
        engine.destroy()
    counts = dist_helpers.all_gather_object((fitted_here, len(fits) - fitted_here))
    results["reconstruct"] = {"weights": reconstructed[True], "masks": chosen[True], "rank0_alone": reconstructed[False], "rank0_alone_masks": chosen[False],
                              "calibration": calibration, "fitted_per_rank": [spread for spread, _ in counts], "fitted_alone_per_rank": [alone for _, alone in counts]}
    if rank == 0:
        torch.save(results, out / "masks.pt")
dist.barrier()
