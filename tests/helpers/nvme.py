"""ds_configs/zero3_nvme.json with its swap folder in a test's temporary folder."""
import json

from conftest import ROOT


def nvme_config(tmp_path) -> str:
    config = json.loads((ROOT / "ds_configs" / "zero3_nvme.json").read_text())
    config["zero_optimization"]["offload_param"].update(nvme_path=str(tmp_path / "nvme"), buffer_size=1_000_000)  # the largest shard: 786,432
    path = tmp_path / "zero3_nvme.json"
    path.write_text(json.dumps(config))
    return str(path)
