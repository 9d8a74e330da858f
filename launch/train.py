"""DSEE fine-tuning entry point; works under every launcher:

    deepspeed --num_gpus 2 --bind_cores_to_rank launch/train.py --ds_config ds_configs/zero3.json
    torchrun --nproc_per_node 2 launch/train.py ...
    mpirun -np 2 python launch/train.py ...          (ranks discovered through mpi4py)
    accelerate launch --config_file launch/accelerate/zero3.yaml launch/train.py ...

With no other flag it runs the built-in offline default (a tiny LLaMA-style model, a
SentencePiece tokenizer trained on a generated corpus, every stage). `--help` lists every option.
"""
import os
import sys
import traceback

from dsee_scale.checkpoint import CheckpointError
from dsee_scale.config import train_config_from_argv
from dsee_scale.ds_config import ConfigError
from dsee_scale.trainer import NonFiniteLoss, Recipe
from dsee_scale.validate import launched_rank


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = train_config_from_argv(argv)
        recipe = Recipe(cfg)
        recipe.setup()
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as err:
        if launched_rank() == 0:
            print(f"dsee_scale: error: {err}", file=sys.stderr)
        return 2
    try:
        recipe.run()
    except BaseException as err:
        # Leave at once: a collective clean-up would wait forever for ranks that are still
        # inside another collective; the launcher then stops every rank.
        if isinstance(err, (CheckpointError, NonFiniteLoss)):  # every rank raises it: one message
            if launched_rank() == 0:
                print(f"dsee_scale: error: {err}", file=sys.stderr)
        else:
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    recipe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
