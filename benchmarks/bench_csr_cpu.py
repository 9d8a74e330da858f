"""Unstructured sparsity on a CPU: does a CSR weight beat the dense one it came from?

    python benchmarks/bench_csr_cpu.py              # GPT-2-medium MLP shapes, fp32, 50/70/90%

Each weight is random, pruned by magnitude to the sparsity, and timed as the dense matrix with
its zeros stored (the baseline, `F.linear`) and as a CSR matrix (`torch.sparse.mm`, MKL's or
torch's own sparse kernel) on the same inputs, in the same run: token batches of 1 and 8
(decoding) and 128 and 512 (prefill), on every thread count up to the cores. The sparse result
is checked against the dense one. One JSON line per measurement, appended to
benchmarks/results/csr_cpu.jsonl (or --out).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from results_io import add_out, record

from dsee_scale.arch import GPT2_SIZES


def latency_ms(fn, budget_s: float) -> float:
    """Median over repeated calls for about budget_s seconds, after warm-up."""
    for _ in range(3):
        fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < budget_s or len(times) < 5:
        tic = time.perf_counter()
        fn()
        times.append((time.perf_counter() - tic) * 1e3)
    return statistics.median(times)


def pruned_weight(out_features: int, in_features: int, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    weight = torch.randn(out_features, in_features, generator=generator)
    threshold = weight.abs().flatten().kthvalue(int(sparsity * weight.numel())).values
    return torch.where(weight.abs() > threshold, weight, torch.zeros(()))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="gpt2-medium", choices=list(GPT2_SIZES))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 128, 512])
    p.add_argument("--budget_s", type=float, default=0.5, help="timing budget per measurement")
    add_out(p, "csr_cpu")
    args = p.parse_args()
    hidden = GPT2_SIZES[args.size][0]
    run_id = time.strftime("%Y%m%dT%H%M%S")
    generator = torch.Generator().manual_seed(0)
    cores = os.cpu_count() or 1
    with torch.inference_mode():
        for shape in ((4 * hidden, hidden), (hidden, 4 * hidden)):  # MLP up and down projections
            for sparsity in args.sparsities:
                dense = pruned_weight(*shape, sparsity, generator)
                csr = dense.to_sparse_csr()
                for tokens in args.tokens:
                    x = torch.randn(tokens, shape[1], generator=generator)
                    xt = x.t().contiguous()
                    torch.testing.assert_close(torch.sparse.mm(csr, xt).t(), F.linear(x, dense), rtol=1e-4, atol=1e-3)  # sums of up to 4096 fp32 products
                    for threads in sorted({1, cores}):
                        torch.set_num_threads(threads)
                        dense_ms = latency_ms(lambda: F.linear(x, dense), args.budget_s)
                        csr_ms = latency_ms(lambda: torch.sparse.mm(csr, xt), args.budget_s)
                        line = {"run_id": run_id, "shape": list(shape), "sparsity": sparsity, "tokens": tokens, "threads": threads,
                                "dense_ms": round(dense_ms, 4), "csr_ms": round(csr_ms, 4), "speedup": round(dense_ms / csr_ms, 3),
                                "cpu": cpu_name(), "torch": torch.__version__}
                        record(line, args.out)


if __name__ == "__main__":
    main()
