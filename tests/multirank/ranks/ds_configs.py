"""Every file in ds_configs/ drives a real engine: 3 DSEE steps each on 2 CPU ranks. Whether
creating the engine imported DeepSpeed's Muon optimizer (it should not) is recorded too: the
module is taken out of sys.modules before each engine (ZeRO-2's backward imports it) and put back."""
import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from common import train_steps

from dsee_scale import DSEEConfig, apply_dsee
from dsee_scale.config import TrainConfig
from dsee_scale.engine import create_engine, init_distributed
from dsee_scale.models import build_model, tiny_config
from dsee_scale.validate import validate_before_launch
from dsee_scale.zero.compat import MUON_MODULE

init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
out = Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
results = {}
for path in sorted(Path("ds_configs").glob("*.json")):
    config = validate_before_launch(TrainConfig(ds_config=str(path), micro_batch_size=2, grad_accum=1, output_dir=str(out / "unused")))
    model = build_model(tiny_config("gpt2"), "lm", ds_config=config)
    apply_dsee(model, DSEEConfig(rank=4, nnz=8, support="magnitude"), ds_config=config)
    real_muon = sys.modules.pop(MUON_MODULE, None)
    engine = create_engine(model, config, lr=1e-2)
    imported_muon = MUON_MODULE in sys.modules
    if real_muon is not None:
        sys.modules[MUON_MODULE] = real_muon
    losses = train_steps(engine, 3, "lm", rank, world)
    results[path.name] = {"losses": losses, "stage": config["zero_optimization"]["stage"], "bf16": config.get("bf16", {}).get("enabled", False),
                         "imported_muon": imported_muon}
    engine.destroy()
    swap = config["zero_optimization"].get("offload_param", {})
    if swap.get("device") == "nvme":  # this run's swap folder (validate names one per run)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(swap["nvme_path"], ignore_errors=True)
if rank == 0:
    (out / "results.json").write_text(json.dumps(results))
