"""Structured DSEE in real processes: each family under 2-rank ZeRO-3 (DSEE, exact pruning,
removal that keeps the logits, re-tuning, a plain reload of its export);
the recipe scores, removes, re-tunes and exports on 2 ranks; `python -m dsee_scale.evaluate`
reports a structured export's accuracy and latency."""
import json

import pytest
import torch
from conftest import tiny_model
from launch_utils import RANKS, run_launcher

from dsee_scale import DSEEConfig, apply_dsee
from dsee_scale.config import PruneConfig
from dsee_scale.export import export_hf
from dsee_scale.structured import compact, ffn_layers, structured_prune


# One 2-rank launch per family (LLaMA's stands for Mistral's and Qwen2's: the same layout)
FAMILIES = [("gpt2", "lm"), ("bert", "cls"), ("llama", "lm"), ("qwen3", "lm"), ("gemma2", "lm"), ("gemma3", "lm"), ("phi3", "lm")]


@pytest.mark.parametrize("kind, task", FAMILIES)
def test_two_rank_zero3_inject_prune_remove_retune_export(kind, task, tmp_path):
    """Under 2-rank ZeRO-3: DSEE on the family's default targets (one process's), an exact global
    prune (the masks of torch.nn.utils.prune), removal of heads and neurons that keeps the logits
    (fused projections cut part by part), re-tuning, and an export that plain transformers reloads
    with the engine's logits (each layer padded to one HF config)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from dsee_scale import dsee_layers
    from dsee_scale.models import build_model
    from helpers.prune_reference import reference_masks
    from ranks.common import eval_batch

    base = tmp_path / "base"
    tiny_model(kind, task).save_pretrained(base)
    run_launcher("ranks", RANKS / "structured_tiny.py", ["--base", base, "--task", task, "--out", tmp_path])
    report = json.loads((tmp_path / "report.json").read_text())
    tensors = torch.load(tmp_path / "tensors.pt", weights_only=True)
    single = apply_dsee(build_model(base, task), DSEEConfig(**report["dsee"]))
    assert report["adapted"] == {name: [list(s) for s in layer.slices] for name, layer in dsee_layers(single).items()}
    expected = reference_masks(single, 0.5, "global", "merged")
    assert set(tensors["masks"]) == set(expected) and all(torch.equal(tensors["masks"][n], m) for n, m in expected.items())
    assert report["max_logit_diff"] < 1e-5
    assert report["heads"] == [2, 2] and report["ffn"] == [f.size - 7 for f in ffn_layers(single)] and report["retune_losses"][-1] < report["retune_losses"][0]
    assert report["shards_partitioned"]
    auto = AutoModelForSequenceClassification if task == "cls" else AutoModelForCausalLM
    plain = auto.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=eval_batch()).logits, tensors["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("score", ["dsee", "gradient"])
def test_two_rank_recipe_structured_prune_retune_export(score, tmp_path):
    """The whole recipe under 2-rank ZeRO-3: score (the gradient score runs calibration forwards
    and backwards through the partitioned model), remove, re-tune on a fresh engine, export."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run_launcher("ranks", "launch/train.py", ["--ds_config", "ds_configs/zero3.json", "--model", "builtin:tiny-gpt2", "--steps", 4, "--retune_steps", 3,
                                                  "--micro_batch_size", 4, "--gen_samples", 2, "--gen_max_new_tokens", 4, "--save_every", 0, "--output_dir", out,
                                                  "--prune.heads", 0.5, "--prune.ffn", 0.3, "--prune.structured_score", score, "--prune.calibration_batches", 2])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["structured"]["flops_saved"] > 0.25 and len(summary["losses"]["retune"]) == 3
    plain = AutoModelForCausalLM.from_pretrained(out / "export" / "merged")
    assert sum(compact(plain).config.dsee_structured["heads"]) == 8  # 4 layers × 4 heads, half removed


def test_evaluate_cli_on_a_structured_minilm_export(tmp_path):
    """Real MiniLM (BERT) classifier: structured prune, export, then `python -m dsee_scale.evaluate
    --latency` in a plain process gives the in-process accuracy and the latency report."""
    import subprocess
    import sys

    from conftest import ROOT, SHARED_DATA, minilm_dir
    from transformers import AutoTokenizer

    from dsee_scale.models import build_model

    labels = {"0": 0, "1": 1}
    model = build_model(minilm_dir(), "cls", num_labels=2, id2label={0: "0", 1: "1"}, label2id=labels, dsee_label_map=labels)
    model = apply_dsee(model, DSEEConfig(rank=4, nnz=16, init="normal", support="magnitude"))
    structured_prune(model, PruneConfig(heads=0.25, ffn=0.3, structured_score="dsee"), ctx=32)
    export_hf(model, tmp_path / "export")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer.save_pretrained(tmp_path / "export")
    dev = tmp_path / "dev.tsv"
    dev.write_text("".join((SHARED_DATA / "sst2" / "test.tsv").read_text().splitlines(keepends=True)[:17]))
    rows = [line.split("\t") for line in dev.read_text().splitlines()[1:]]
    with torch.no_grad():
        enc = tokenizer([r[0] for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt")
        expected = (model.eval()(**enc).logits.argmax(-1) == torch.tensor([int(r[1]) for r in rows])).float().mean().item()
    proc = subprocess.run([sys.executable, "-m", "dsee_scale.evaluate", "--model", str(tmp_path / "export"), "--eval_file", str(dev), "--task", "cls",
                           "--text_column", "sentence", "--max_length", "32", "--latency", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["accuracy"] == pytest.approx(expected)
    assert result["latency"]["flops_saved"] > 0.2 and result["latency"]["batch_shape"][0] == 8
