"""The cost of the sparsity-preserving re-tune (ΔW ⊙ M) against DSEE's ordinary forward.

    python benchmarks/bench_masked_retune.py                      # GPT-2-medium config, batch 2 × 128
    python benchmarks/bench_masked_retune.py --model gpt2 --steps 5

One training step (forward + backward + AdamW) of a 50%-pruned model with DSEE on q,v (r=16,
64 nnz), in one process per variant, so each peak RSS is its own:
  dsee             ΔW = (α/r)·B·A + S applied as factors (the re-tune of `prune.keep_sparse false`)
  masked_autograd  x·(ΔW ⊙ M)ᵀ differentiated by autograd, which keeps one dense ΔW ⊙ M per
                   adapted layer from forward to backward (the formulation before MaskedDeltaLinear)
  masked           MaskedDeltaLinear (the default re-tune): ΔW ⊙ M formed again in backward,
                   one layer at a time
Prints and appends one JSON line per variant to benchmarks/results/masked_retune.jsonl, with
s/step and peak RSS, and both as ratios to `dsee` measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_io import add_out, record

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("dsee", "masked_autograd", "masked")


def worker(args) -> dict:
    import torch
    from torch import nn

    from dsee_scale import DSEEConfig, apply_dsee
    from dsee_scale.inject import dsee_layers
    from dsee_scale.layer import DSEELayer
    from dsee_scale.models import build_model, builtin_config
    from dsee_scale.prune import prune_unstructured

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build_model(builtin_config(f"builtin:{args.model}"), "lm")
    apply_dsee(model, DSEEConfig(rank=16, alpha=32, nnz=64, targets=["c_attn:q,v"], support="magnitude"))
    masks = prune_unstructured(model, 0.5)
    if args.variant != "dsee":
        for name, layer in dsee_layers(model).items():
            layer.keep_mask(~masks[f"{name}.weight"].dense().reshape(layer.base.weight.shape))
    if args.variant == "masked_autograd":
        def autograd_forward(self: DSEELayer, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + nn.functional.linear(self.dropout(x), self._masked_delta(*self.adapter_parameters()))

        DSEELayer.forward = autograd_forward
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(args.warmup + args.steps):
        tic = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - tic)
    return {"s_per_step": statistics.median(times), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-medium", help="builtin GPT-2 size")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    add_out(p, "masked_retune")
    args = p.parse_args()
    if args.variant:
        print(json.dumps(worker(args)))
        return
    run_id = time.strftime("%Y%m%dT%H%M%S")
    flags = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("variant", "out")]
    rows = {}
    for variant in VARIANTS:
        done = subprocess.run([sys.executable, __file__, *flags, f"--variant={variant}"], check=True, capture_output=True, text=True)
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    for variant, row in rows.items():
        line = {"run_id": run_id, "variant": variant, "model": args.model, "batch": args.batch, "seq": args.seq, **row,
                "time_vs_dsee": row["s_per_step"] / rows["dsee"]["s_per_step"], "rss_vs_dsee": row["peak_rss_mb"] / rows["dsee"]["peak_rss_mb"]}
        record(line, args.out)


if __name__ == "__main__":
    main()
