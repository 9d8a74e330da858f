"""Peak host memory of LM evaluation: the labelled call evaluation made before (HF's loss on the
whole logits, then the token-loss sums on them upcast again) against evaluate.lm_sums (no labels;
the LM head and the fp32 cross-entropy run on CHUNK_TOKENS target tokens at a time), on a tiny
LLaMA with a 32k vocabulary, in one process, at growing sequence lengths.

    python benchmarks/bench_eval_memory.py [--vocab 32000] [--lengths 512,1024,2048,4096]

Each measurement resets the process's peak RSS (Linux: /proc/self/clear_refs) and reports how far
the peak rose above the RSS before it; one JSON line per length with both peaks and their ratio.
The labelled path grows with batch × length × vocabulary; lm_sums stays at the chunk's logits.
"""
import argparse
import json
import re
from pathlib import Path

import torch

from dsee_scale.evaluate import lm_sums


def labelled_sums(logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(summed token loss, tokens) as evaluation computed them before lm_sums, from the logits of
    a call with labels: the reference for tests/unit/test_evaluate.py too."""
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    counted = (labels[:, 1:] != -100) & real[:, None]
    return torch.stack([(losses * counted).sum().double(), counted.sum().double()])


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_rise_mb(run) -> float:
    """How far this process's peak RSS rose above its RSS while `run()` ran, in MiB."""
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the RSS now
    before = _status_kb("VmRSS")
    run()
    return (_status_kb("VmHWM") - before) / 1024


@torch.no_grad()
def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--lengths", default="512,1024,2048,4096", help="tokens per row, comma-separated")
    p.add_argument("--batch", type=int, default=2, help="rows per forward")
    args = p.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(lengths))
    model = LlamaForCausalLM(config).eval()
    real = torch.ones(args.batch, dtype=torch.bool)
    for length in lengths:
        ids = torch.randint(0, args.vocab, (args.batch, length))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        paths = {"labelled": lambda: labelled_sums(model(**batch).logits, ids, real), "lm_sums": lambda: lm_sums(model, model, batch, real)}
        for run in paths.values():  # once first: the allocator's and the model's one-time costs
            run()
        peaks = {name: peak_rise_mb(run) for name, run in paths.items()}
        print(json.dumps({"vocab": args.vocab, "batch": args.batch, "length": length, "fp32_logits_mb": round(args.batch * length * args.vocab * 4 / 2**20, 1),
                          **{f"peak_{name}_mb": round(mb, 1) for name, mb in peaks.items()}, "ratio": round(peaks["labelled"] / peaks["lm_sums"], 2)}), flush=True)


if __name__ == "__main__":
    main()
