"""--export_format compressed: the merged export rewritten in the compressed-tensors format
(sparse-bitmask, or sparse-24-bitmask for 2:4) reloads through compressed_tensors to the merged
model's logits, stores the pruned weights in fewer bytes, and says its format in config.json."""
import json
import re

import pytest
import torch
from launch_utils import one_process
from safetensors import safe_open

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


def logits(model) -> torch.Tensor:
    ids = torch.arange(1, 25).reshape(2, 12)
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def load_compressed(folder):
    """compressed-tensors 0.13's load path: a model from the folder's config, then decompress.
    (transformers >= 5 reads compressed-tensors folders only with compressed-tensors >= 0.15,
    which has no sparse formats.)"""
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoConfig

    from dsee_scale.models import TASK_MODELS

    model = TASK_MODELS["lm"].from_config(AutoConfig.from_pretrained(folder))
    ModelCompressor.from_pretrained(str(folder)).decompress(str(folder), model)
    model.tie_weights()  # decompress replaces every parameter: a tied head must be re-tied to the loaded embedding
    return model


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


@pytest.mark.parametrize("fmt", ["sparse-bitmask", "sparse-24-bitmask"])
def test_a_sharded_folder_is_compressed_shard_by_shard(tmp_path, fmt):
    """export_compressed on its own: a 2:4-pruned tiny LLaMA exported in several shards."""
    from conftest import tiny_model

    from dsee_scale.export import export_compressed, export_hf
    from dsee_scale.semistructured import nm_keep

    model = tiny_model("llama")
    pruned = [n for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2]
    with torch.no_grad():
        for name in pruned:
            weight = model.get_parameter(name)
            weight.mul_(nm_keep(weight.abs(), 2, 4, dim=1))
    export_hf(model, tmp_path / "merged", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    out = export_compressed(tmp_path / "merged", tmp_path / "compressed", fmt, pruned)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map.values()) == set(index["weight_map"].values()) and f"{pruned[0][:-len('.weight')]}.bitmask" in weight_map
    torch.testing.assert_close(logits(load_compressed(out)), logits(model), atol=1e-5, rtol=0)


def test_a_weight_that_is_not_2_4_along_its_rows_is_refused(tmp_path):
    from safetensors.torch import save_file

    from dsee_scale.export import export_compressed

    (tmp_path / "merged").mkdir()
    weight = torch.randn(8, 8) * torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(2)[:, None]  # 2:4 down the columns (Conv1D-like)
    save_file({"fc.weight": weight}, str(tmp_path / "merged" / "model.safetensors"))
    with pytest.raises(ValueError, match="fc.weight is not 2:4 sparse along its rows"):
        export_compressed(tmp_path / "merged", tmp_path / "compressed", "sparse-24-bitmask", ["fc.weight"])


def test_2_4_on_conv1d_weights_is_refused_before_training(tmp_path):
    """sparse-24-bitmask groups along stored rows; GPT-2's Conv1D stores (in, out)."""
    proc = one_process(["--model", "builtin:tiny-gpt2", *QUICK, "--prune.pattern", "2:4", "--output_dir", tmp_path / "run"])
    assert proc.returncode == 2
    assert "is a Conv1D weight stored (in, out)" in proc.stderr and "use export_format hf" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("flags, message", [
    (["--export_format", "onnx"], "--export_format: Input should be 'hf' or 'compressed' (got 'onnx')"),
    (["--export_format", "compressed", "--prune.sparsity", "0"], "this run prunes none"),
    (["--export_format", "compressed", "--export_merged", "false"], "set export_merged true"),
    (["--export_format", "compressed", "--prune.keep_sparse", "false"], "keep prune.keep_sparse true or set export_remask true"),
], ids=["unknown", "nothing-pruned", "no-merged-folder", "dense-delta"])
def test_bad_export_format_options_are_named(flags, message):
    from dsee_scale.config import train_config_from_argv

    with pytest.raises(ValueError, match=re.escape(message)):
        train_config_from_argv(flags)
