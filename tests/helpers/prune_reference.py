"""Reference masks for pruning tests of every tier: torch.nn.utils.prune, and plain loops over
output rows (Wanda's, at OWL's block sparsities) and over N:M groups, on dense scores of the same
weights; the input norms of a model's pruned weights recorded by hooks, and prune_tiny.py's
results checked against them (tests only)."""
import re
from pathlib import Path

import torch
import torch.nn.utils.prune as torch_prune
from transformers.pytorch_utils import Conv1D

from dsee_scale import DSEEConfig, apply_dsee
from dsee_scale.config import PruneConfig
from dsee_scale.models import build_model
from dsee_scale.prune import prune_nm, prune_targets

DSEE = DSEEConfig(rank=4, alpha=8.0, nnz=8, support="magnitude", init="normal")
DEFAULTS = PruneConfig()


def signed_delta(target) -> torch.Tensor:
    """ΔW of one target in its storage layout (zeros without an adapter)."""
    if target.layer is None:
        return torch.zeros_like(target.param.data, dtype=torch.float32)
    delta = target.layer.delta_weight().detach()
    return delta.t() if target.layer.transposed else delta


def dense_scores(target, score: str, norms: dict | None = None) -> torch.Tensor:
    """|W|, |W + ΔW|, |ΔW| or |W + ΔW|·‖x_j‖ (norms[name]: one per input feature) of one target
    as a dense matrix in its storage layout."""
    dense = target.param.data.float()
    if score != "weight" and target.layer is not None:
        delta = signed_delta(target)
        dense = delta if score == "delta" else dense + delta
    if score == "activation":
        norm = norms[target.name]
        return dense.abs() * (norm[:, None] if isinstance(target.module, Conv1D) else norm[None, :])
    return dense.abs()


def reference_masks(model, sparsity: float, scope: str = "global", score: str = "weight", norms: dict | None = None,
                    options: dict | None = None) -> dict[str, torch.Tensor]:
    """Masks (True = pruned) from torch.nn.utils.prune (global, layer) or the row loop (row, owl
    with `options` owl_m, owl_lambda) on dense scores of the same weights."""
    targets = prune_targets(model, DEFAULTS.include, DEFAULTS.exclude)
    if scope in ("row", "owl"):
        scores = {t.name: dense_scores(t, score, norms) for t in targets}
        per_target = reference_owl_sparsities(scores, sparsity, **(options or {})) if scope == "owl" else dict.fromkeys(scores, sparsity)
        return {t.name: reference_row_mask(scores[t.name], per_target[t.name], isinstance(t.module, Conv1D)).flatten() for t in targets}
    holders = []
    for t in targets:
        holder = torch.nn.Module()
        holder.weight = torch.nn.Parameter(dense_scores(t, score, norms).contiguous().clone())
        holders.append(holder)
    if scope == "global":
        torch_prune.global_unstructured([(h, "weight") for h in holders], pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    else:
        for h in holders:
            torch_prune.l1_unstructured(h, "weight", amount=sparsity)
    return {t.name: (h.weight_mask == 0).flatten() for t, h in zip(targets, holders)}


def reference_row_mask(scores: torch.Tensor, sparsity: float, transposed: bool) -> torch.Tensor:
    """The round(sparsity × in) lowest scores of each output row (Conv1D's rows are columns),
    ties to the lower index, by a plain sort of each row."""
    rows = scores.t() if transposed else scores
    pruned = torch.zeros_like(rows, dtype=torch.bool)
    k = int(round(sparsity * rows.shape[1]))
    for r in range(rows.shape[0]):
        values = rows[r].tolist()
        for i in sorted(range(len(values)), key=lambda i: (values[i], i))[:k]:
            pruned[r, i] = True
    return pruned.t() if transposed else pruned


def reference_owl_sparsities(scores: dict[str, torch.Tensor], sparsity: float, owl_m: float = 5.0, owl_lambda: float = 0.08) -> dict[str, float]:
    """Each weight's OWL sparsity, as luuyin/OWL's prune_wanda_outlier computes it: blocks by
    their '.h.3.' / '.layer.3.' / '.layers.3.' name part; outlier ratio = share of the block's
    scores above owl_m × their mean; ratios min-max scaled to [0, 2λ] and centred on the target."""
    block_of = {name: int(re.search(r"\.(?:h|layer|layers)\.(\d+)\.", name).group(1)) for name in scores}
    blocks = sorted(set(block_of.values()))
    ratios = []
    for b in blocks:
        flat = torch.cat([s.flatten().double() for name, s in scores.items() if block_of[name] == b])
        ratios.append((flat > owl_m * flat.mean()).double().mean().item())
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * owl_lambda if hi > lo else 0.0 for r in ratios]
    mean = sum(scaled) / len(scaled)
    per_block = {b: sparsity - (x - mean) for b, x in zip(blocks, scaled)}
    return {name: per_block[block_of[name]] for name in scores}


def reference_nm_masks(model, n: int, m: int, score: str, norms: dict | None = None) -> dict[str, torch.Tensor]:
    """N:M masks (True = pruned) by a plain loop over groups along the input dimension."""
    out = {}
    for t in prune_targets(model, DEFAULTS.include, DEFAULTS.exclude):
        scores = dense_scores(t, score, norms)
        transposed = isinstance(t.module, Conv1D)
        rows = scores.t() if transposed else scores  # (out, in): groups run along each row
        pruned = torch.zeros_like(rows, dtype=torch.bool)
        for r in range(rows.shape[0]):
            for g in range(0, rows.shape[1], m):
                group = rows[r, g : g + m].tolist()
                keep = sorted(range(m), key=lambda i: (-group[i], i))[:n]
                for i in range(m):
                    pruned[r, g + i] = i not in keep
        out[t.name] = (pruned.t() if transposed else pruned).flatten()
    return out


def recorded_inputs(model, batches) -> dict[str, torch.Tensor]:
    """Every input row each pruned weight's module saw (test only), real tokens of per-token inputs."""
    targets = prune_targets(model, DEFAULTS.include, DEFAULTS.exclude)
    seen = {t.name: [] for t in targets}
    current = {}

    def record(name, x):
        keep = current["mask"]
        seen[name].append(x[keep] if x.shape[:-1] == keep.shape else x.reshape(-1, x.shape[-1]))

    handles = [t.module.register_forward_hook(lambda mod, args, out, name=t.name: record(name, args[0].detach())) for t in targets]
    with torch.no_grad():
        for batch in batches:
            current["mask"] = batch["attention_mask"].bool()
            model(**batch)
    for h in handles:
        h.remove()
    return {name: torch.cat(rows).float() for name, rows in seen.items()}


def recorded_input_norms(model, batches) -> dict[str, torch.Tensor]:
    """‖x_j‖ from every input each pruned weight's module saw (test only)."""
    return {name: x.double().norm(dim=0).float() for name, x in recorded_inputs(model, batches).items()}


def check_prune_tiny_results(results: dict, base: Path, task: str, on_gpu: bool = False) -> None:
    """prune_tiny.py's masks.pt against one process here on the same weights: the 2:4 re-fit on all
    the calibration batches (spread over the ranks, and equal to rank 0 fitting alone), the ranks'
    all-reduced input norms, and every case's masks
    (torch.nn.utils.prune's, or the N:M loop's) with its count of zeros. on_gpu: the ranks ran on
    GPUs, whose products (ΔW = B·A, activations) round otherwise than this CPU's, so scores within
    rounding of a threshold may fall on either side: masks scored from |W| alone stay exact, the
    others may differ in 0.1% of their entries, norms and re-fitted weights agree to looser bounds."""
    norm_tol, refit_tol = ((1e-4, 1e-5), (1e-3, 1e-4)) if on_gpu else ((1e-5, 1e-6), (1e-4, 1e-5))
    results = dict(results)
    reconstructed = results.pop("reconstruct")  # 2:4 + reconstruction: the same weights as one process on all the batches
    model = apply_dsee(build_model(base, task), DSEE).eval()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in reconstructed["calibration"]]
    prune_nm(model, "2:4", score="activation", calibration=(batches, lambda batch: model(**batch)), reconstruct=True)
    targets = prune_targets(model, DEFAULTS.include, DEFAULTS.exclude)
    for t in targets:
        torch.testing.assert_close(reconstructed["weights"][t.name], t.param.detach(), rtol=refit_tol[0], atol=refit_tol[1], msg=t.name)
    # spread over the ranks (each fitted some) and on rank 0 alone: the same fit of the same XᵀX,
    # so on CPUs the same masks and weights bit for bit (GPUs: 0.1% of the masks, weights to refit_tol)
    spread, alone = reconstructed["fitted_per_rank"], reconstructed["fitted_alone_per_rank"]
    assert sum(spread) == len(targets) and min(spread) > 0 and alone == [len(targets)] + [0] * (len(alone) - 1), (spread, alone)
    assert set(reconstructed["masks"]) == set(reconstructed["rank0_alone_masks"]) == {t.name for t in targets}
    for name, weight in reconstructed["rank0_alone"].items():
        assert (reconstructed["masks"][name] != reconstructed["rank0_alone_masks"][name]).float().mean().item() <= (1e-3 if on_gpu else 0.0), name
        if on_gpu:
            torch.testing.assert_close(reconstructed["weights"][name], weight, rtol=refit_tol[0], atol=refit_tol[1], msg=name)
        else:
            assert torch.equal(reconstructed["weights"][name], weight), name

    for key, got in results.items():
        scope, score, sparsity = key.split("-")
        model = apply_dsee(build_model(base, task), DSEE)
        norms = got.get("norms")
        if norms:  # the ranks' all-reduced norms: those of the whole calibration batch in one process
            single = recorded_input_norms(model.eval(), [{k: v for k, v in b.items() if k != "labels"} for b in got["calibration"]])
            for name, norm in norms.items():
                torch.testing.assert_close(norm, single[name], rtol=norm_tol[0], atol=norm_tol[1])
        expected = reference_nm_masks(model, 2, 4, score, norms) if scope == "pattern" else reference_masks(model, float(sparsity), scope, score, norms, got.get("options"))
        assert set(got["masks"]) == set(expected)
        allowed = 1e-3 if on_gpu and score != "weight" else 0.0
        for name, mask in got["masks"].items():
            assert mask.shape == expected[name].shape and (mask != expected[name]).float().mean().item() <= allowed, (key, name)
        if scope == "global":
            assert got["zeros"] == round(float(sparsity) * got["numel"])
        if scope == "pattern":
            assert got["zeros"] * 2 == got["numel"]
