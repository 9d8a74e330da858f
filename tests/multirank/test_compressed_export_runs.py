"""--export_format compressed: the merged export rewritten in the compressed-tensors format
(sparse-bitmask, or sparse-24-bitmask for 2:4) reloads through compressed_tensors to the merged
model's logits, stores the pruned weights in fewer bytes, and says its format in config.json
(launch/train.py as one process)."""
import json

import pytest
import torch
from launch_utils import one_process
from safetensors import safe_open

from helpers.compressed_io import load_compressed, logits

QUICK = ["--steps", 2, "--retune_steps", 1, "--stages", "tune,prune,retune,export", "--micro_batch_size", 4, "--save_every", 0,
         "--export_format", "compressed"]
CASES = {  # id: (model, pruning flags, format)
    "llama-unstructured": ("builtin:tiny-llama", ["--prune.sparsity", 0.5], "sparse-bitmask"),
    "llama-2:4": ("builtin:tiny-llama", ["--prune.pattern", "2:4"], "sparse-24-bitmask"),
    "gpt2-unstructured": ("builtin:tiny-gpt2", ["--prune.sparsity", 0.5], "sparse-bitmask"),  # Conv1D (in, out) weights
}


def tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_compressed_export_reloads_exactly_and_is_smaller(tmp_path, case):
    from dsee_scale.models import TASK_MODELS

    model, pruning, fmt = CASES[case]
    run = tmp_path / "run"
    proc = one_process(["--model", model, *QUICK, *pruning, "--output_dir", run])
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged, compressed = run / "export" / "merged", run / "export" / "compressed"

    config = json.loads((compressed / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["sparsity_config"]["format"] == fmt
    assert config["sparsity_config"]["global_sparsity"] == pytest.approx(0.5)
    assert (compressed / "tokenizer_config.json").exists()

    dense, packed = tensors(merged), tensors(compressed)
    targets = config["sparsity_config"]["targets"]
    assert targets and all(f"{t}.weight" in dense and f"{t}.weight" not in packed for t in targets)
    assert not any(name.endswith("embed_tokens.weight") or name.endswith("wte.weight") for name in (f"{t}.weight" for t in targets))
    dense_bytes = sum(dense[f"{t}.weight"].nbytes for t in targets)
    packed_bytes = sum(v.nbytes for k, v in packed.items() if k.rpartition(".")[0] in targets)
    assert packed_bytes < 0.6 * dense_bytes  # half the values + 1 bit per entry (+ row offsets)
    assert (compressed / "model.safetensors").stat().st_size < (merged / "model.safetensors").stat().st_size

    expected = logits(TASK_MODELS["lm"].from_pretrained(merged))
    torch.testing.assert_close(logits(load_compressed(compressed)), expected, atol=1e-5, rtol=0)


def test_2_4_on_conv1d_weights_is_refused_before_training(tmp_path):
    """sparse-24-bitmask groups along stored rows; GPT-2's Conv1D stores (in, out)."""
    proc = one_process(["--model", "builtin:tiny-gpt2", *QUICK, "--prune.pattern", "2:4", "--output_dir", tmp_path / "run"])
    assert proc.returncode == 2
    assert "is a Conv1D weight stored (in, out)" in proc.stderr and "use export_format hf" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
