"""2:4 semi-structured sparsity on a GPU: latency of dense vs 2:4 weights (needs CUDA, sm80+).

    python benchmarks/bench_sparse24.py                 # bf16: GPT-2-medium MLP and whole forward
    python benchmarks/bench_sparse24.py --dtype float16

Weights are random, pruned 2:4 by magnitude along the input dimension (`nm_keep`), then swapped
for PyTorch semi-structured tensors (`to_semi_structured`, cuSPARSELt or CUTLASS kernels). The
baseline is the same pruned model with its zeros stored densely, measured in the same run.
Batches are 1, 8 and 64 sequences of --seq tokens, timed eagerly and as a replayed CUDA graph;
MLPs of the model's width and of 4x it; the sparse forward's output is checked against the dense one's. One JSON line per measurement, appended to
benchmarks/results/sparse24.jsonl (or --out).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from results_io import add_out, record

from dsee_scale.arch import GPT2_SIZES
from dsee_scale.semistructured import input_dim, nm_keep, to_semi_structured

ROOT = Path(__file__).resolve().parent.parent


def prune_24(model: nn.Module) -> int:
    """2:4 by |W| on every weight of the blocks; returns how many matrices were pruned."""
    from transformers.pytorch_utils import Conv1D

    pruned = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)) and "lm_head" not in name:
                module.weight.mul_(nm_keep(module.weight.abs(), 2, 4, input_dim(module)))
                pruned += 1
    return pruned


def latency_ms(fn, iters: int, graph: bool) -> float:
    """Median of `iters` CUDA-event timings after warm-up; `graph` replays a captured CUDA graph
    (no Python or launch overhead, as serving engines run)."""
    for _ in range(3):
        fn()
    if graph:
        captured = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(captured):
            fn()
        fn = captured.replay
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def mlp(hidden: int, dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)).to("cuda", dtype).eval()


def gpt2(size: str, dtype: torch.dtype) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    hidden, layers, heads = GPT2_SIZES[size]
    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, attn_implementation="sdpa")
    return GPT2LMHeadModel(config).to("cuda", dtype).eval()


def compare(kind: str, build, inputs, args, run_id: str, backend: str, out: str) -> None:
    dense = build()
    pruned = prune_24(dense)
    sparse = build()
    sparse.load_state_dict(dense.state_dict())
    if backend == "cutlass":
        from torch.sparse import SparseSemiStructuredTensor

        SparseSemiStructuredTensor._FORCE_CUTLASS = True
    swapped = to_semi_structured(sparse)
    for batch in args.batches:
        x = inputs(batch)
        with torch.inference_mode():
            call = (lambda m: (lambda: m(input_ids=x).logits)) if kind.startswith("gpt2") else (lambda m: (lambda: m(x)))
            ref, got = call(dense)(), call(sparse)()
            rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            for graph in (False, True):
                try:
                    dense_ms = latency_ms(call(dense), args.iters, graph)
                    sparse_ms = latency_ms(call(sparse), args.iters, graph)
                except Exception as error:  # a kernel that cannot be captured is a result too
                    dense_ms = sparse_ms = float("nan")
                    print(f"{kind} batch {batch} graph={graph}: {error}".splitlines()[0], flush=True)
                line = {"run_id": run_id, "model": kind, "dtype": args.dtype, "backend": backend, "cuda_graph": graph, "batch": batch, "seq": args.seq,
                        "matrices_2of4": len(swapped), "matrices_pruned": pruned, "dense_ms": round(dense_ms, 4), "sparse24_ms": round(sparse_ms, 4),
                        "speedup": round(dense_ms / sparse_ms, 3), "relative_l2_diff": rel, "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
                record(line, out)
    if backend == "cutlass":
        SparseSemiStructuredTensor._FORCE_CUTLASS = False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--size", default="gpt2-medium", choices=list(GPT2_SIZES))
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--iters", type=int, default=30)
    add_out(p, "sparse24")
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        sys.exit("bench_sparse24 needs a CUDA GPU with sparse tensor cores (compute capability 8.0 or later)")
    dtype = getattr(torch, args.dtype)
    hidden = GPT2_SIZES[args.size][0]
    run_id = time.strftime("%Y%m%dT%H%M%S")
    torch.manual_seed(0)
    # CUTLASS's 2:4 kernels exist for compute capability 8.x only; cuSPARSELt covers 8.0 and later.
    backends = ("cusparselt", "cutlass") if torch.cuda.get_device_capability()[0] == 8 else ("cusparselt",)
    for width in (hidden, 4 * hidden):
        for backend in backends:
            compare(f"mlp-{width}", lambda: mlp(width, dtype), lambda b: torch.randn(b, args.seq, width, device="cuda", dtype=dtype), args, run_id, backend, args.out)
    compare(args.size, lambda: gpt2(args.size, dtype), lambda b: torch.randint(0, 50257, (b, args.seq), device="cuda"), args, run_id, "cusparselt", args.out)


if __name__ == "__main__":
    main()
