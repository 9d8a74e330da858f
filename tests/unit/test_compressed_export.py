"""export_compressed on its own (the compressed-tensors copy of a merged export, shard by shard,
2:4 checked along rows) and the export_format options refused (whole runs:
tests/multirank/test_compressed_export_runs.py)."""
import json
import re

import pytest
import torch

from helpers.compressed_io import load_compressed, logits


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
