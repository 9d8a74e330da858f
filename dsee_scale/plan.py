"""Per-GPU memory and per-step traffic of full fine-tuning, LoRA and DSEE under ZeRO-3, and of
DSEE with the frozen weights on NVMe (ZeRO-Infinity).

    python -m dsee_scale.plan --model gpt2-xl --nodes 2 --gpus-per-node 8 --seq 1024 --micro-batch 4
    python -m dsee_scale.plan --model llama-7b --nodes 1 --gpus-per-node 2 --seq 64 --micro-batch 1

Model states follow DeepSpeed's accounting (mixed precision: 2-byte weights, fp32 gradient
partition, fp32 master copy and Adam moments for what is trained), so the full fine-tuning figure equals
`estimate_zero3_model_states_mem_needs` (18 bytes per parameter / GPUs + 4 bytes × the largest
layer). A frozen backbone needs only its 2-byte partition; adapters are kept whole on every GPU.
Activations use the per-layer estimate of Korthikanti et al. (2022), s·b·h·(34 + 5·a·s/h) bytes,
or 2·s·b·h per layer plus one layer's worth with activation checkpointing. The NVMe row keeps
each GPU's weight partition on disk: the GPU holds the gathered layer, host memory DeepSpeed's
swap buffers (buffer_count of the largest weight's partition); each step reads the partition
twice (forward, backward), three times with activation checkpointing. Weights count 2 bytes
(bf16 on GPUs); on CPU hosts, which run fp32, weights, disk and reads are twice these.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from dsee_scale.arch import GPT2_SIZES, LLAMA_SIZES

GIB = 2**30
SWAP_BUFFERS = 5  # offload_param.buffer_count of ds_configs/zero3_nvme.json


@dataclass
class Shape:
    """GPT-2 (tied embeddings, fused c_attn, 4h MLP), or LLaMA when `ffn` is given (untied head,
    q/k/v/o, gated MLP of width ffn, no biases)."""

    hidden: int
    layers: int
    heads: int
    vocab: int = 50257
    positions: int = 1024
    ffn: int | None = None

    @property
    def block(self) -> int:
        h = self.hidden
        return 12 * h * h + 13 * h if self.ffn is None else 4 * h * h + 3 * h * self.ffn + 2 * h

    @property
    def params(self) -> int:
        h = self.hidden
        if self.ffn is None:
            return self.vocab * h + self.positions * h + self.layers * self.block + 2 * h
        return 2 * self.vocab * h + self.layers * self.block + h

    @property
    def largest_layer(self) -> int:
        return max(self.vocab * self.hidden, self.block)

    @property
    def largest_param(self) -> int:
        return self.hidden * max(self.vocab, 4 * self.hidden if self.ffn is None else self.ffn)


def shape_of(name: str) -> Shape:
    if name in LLAMA_SIZES:
        hidden, layers, heads, ffn = LLAMA_SIZES[name]
        return Shape(hidden, layers, heads, vocab=32000, ffn=ffn)
    return Shape(*GPT2_SIZES[name])


def trainable_params(shape: Shape, method: str, rank: int, nnz: int) -> int:
    """DSEE on q and v; LoRA on the same (GPT-2: the whole fused c_attn, the same budget)."""
    h = shape.hidden
    if method == "full":
        return shape.params
    if method == "lora":
        return shape.layers * rank * (h + 3 * h) if shape.ffn is None else shape.layers * 2 * rank * (h + h)
    return shape.layers * (2 * rank * (h + h) + 2 * nnz)


def activation_bytes(shape: Shape, seq: int, micro: int, checkpointing: bool) -> int:
    per_layer = seq * micro * shape.hidden * (34 + 5 * shape.heads * seq / shape.hidden)
    logits = 4 * seq * micro * shape.vocab  # fp32 logits for the loss
    if checkpointing:
        return int(shape.layers * 2 * seq * micro * shape.hidden + per_layer + logits)
    return int(shape.layers * per_layer + logits)


def plan(shape: Shape, method: str, gpus: int, gpus_per_node: int, seq: int, micro: int, checkpointing: bool, rank: int = 16, nnz: int = 64,
         nvme: bool = False) -> dict:
    p, t = shape.params, trainable_params(shape, method, rank, nnz)
    partition = 2 * p / gpus
    states = {
        "weights": (0 if nvme else partition) + 4 * shape.largest_layer,
        "adapters_whole": 2 * t if method != "full" else 0,
        "gradients": 4 * t / gpus,  # fp32 gradient partition
        "optimizer": 12 * t / gpus,  # fp32 master copy + Adam m and v
    }
    activations = activation_bytes(shape, seq, micro, checkpointing)
    gather = 2 * 2 * p * (gpus - 1) / gpus  # bf16 weights, gathered in forward and again in backward
    inter_node = gather if gpus > gpus_per_node else 0.0
    return {
        "method": method + ("+nvme" if nvme else ""), "params": p, "trainable": t, "trainable_pct": round(100 * t / p, 3),
        "weights_gib": round(states["weights"] / GIB, 3), "adapters_gib": round(states["adapters_whole"] / GIB, 4),
        "gradients_gib": round(states["gradients"] / GIB, 4), "optimizer_gib": round(states["optimizer"] / GIB, 4),
        "model_states_gib": round(sum(states.values()) / GIB, 3), "activations_gib": round(activations / GIB, 3),
        "total_gib": round((sum(states.values()) + activations) / GIB, 3),
        "allgather_gib_per_step": round(gather / GIB, 3), "inter_node_allgather_gib_per_step": round(inter_node / GIB, 3),
        "reduce_scatter_gib_per_step": round(2 * t * (gpus - 1) / gpus / GIB, 4),
        "host_swap_gib": round(SWAP_BUFFERS * 2 * shape.largest_param / gpus / GIB, 3) if nvme else 0.0,
        "disk_gib": round(partition / GIB, 3) if nvme else 0.0, "nvme_read_gib_per_step": round((3 if checkpointing else 2) * partition / GIB, 3) if nvme else 0.0,
    }


def recommend(rows: list[dict], gpu_gib: float) -> str:
    for method, label, config in (("dsee", "DSEE", "zero3_gpt2xl.json"), ("dsee+nvme", "DSEE, frozen weights on NVMe,", "zero3_nvme.json")):
        fits = [r for r in rows if r["method"] == method and r["total_gib"] <= 0.9 * gpu_gib]
        if fits:
            best = min(fits, key=lambda r: (r["checkpointing"], r["total_gib"]))
            ckpt = "with" if best["checkpointing"] else "without"
            return f"{label} {ckpt} activation checkpointing: {best['total_gib']} GiB of {gpu_gib} GiB per GPU; ds_configs/{config}"
    return f"DSEE does not fit in {gpu_gib} GiB at this micro-batch, even with its frozen weights on NVMe: lower --micro-batch or add GPUs"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-xl", choices=sorted({**GPT2_SIZES, **LLAMA_SIZES}))
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--nnz", type=int, default=64)
    p.add_argument("--gpu-gib", type=float, default=80.0)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = p.parse_args(argv)
    shape = shape_of(args.model)
    gpus = args.nodes * args.gpus_per_node
    rows = []
    for method, nvme in (("full", False), ("lora", False), ("dsee", False), ("dsee", True)):
        for checkpointing in (False, True):
            row = plan(shape, method, gpus, args.gpus_per_node, args.seq, args.micro_batch, checkpointing, args.rank, args.nnz, nvme)
            rows.append({**row, "checkpointing": checkpointing})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{args.model}: {shape.params:,} parameters, {args.nodes} node(s) × {args.gpus_per_node} GPUs, seq {args.seq}, micro-batch {args.micro_batch} (GiB per GPU)")
    cols = ["method", "checkpointing", "trainable_pct", "weights_gib", "optimizer_gib", "gradients_gib", "activations_gib", "total_gib", "allgather_gib_per_step",
            "inter_node_allgather_gib_per_step", "reduce_scatter_gib_per_step", "host_swap_gib", "disk_gib", "nvme_read_gib_per_step"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    print("recommendation:", recommend(rows, args.gpu_gib))


if __name__ == "__main__":
    main()

