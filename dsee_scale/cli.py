"""DSEE fine-tuning from the command line: `dsee-train` (the console script), `python -m
dsee_scale.cli` and `launch/train.py` are the same program, under every launcher:

    deepspeed --num_gpus 8 $(command -v dsee-train) --ds_config ds_configs/zero3_bf16.json ...
    torchrun --nproc_per_node 8 --no-python dsee-train ...     (or: torchrun -m dsee_scale.cli)
    mpirun -np 2 dsee-train ...                                (ranks discovered through mpi4py)
    accelerate launch --config_file launch/accelerate/zero3.yaml -m dsee_scale.cli ...

With no other flag it runs the built-in offline default (a tiny LLaMA-style model, a
SentencePiece tokenizer trained on a generated corpus, every stage). `--help` lists every option.
"""
import logging
import os
import sys
import time
import traceback

from dsee_scale.checkpoint import CheckpointError
from dsee_scale.config import train_config_from_argv
from dsee_scale.ds_config import ConfigError
from dsee_scale.extras import MissingExtra
from dsee_scale.trainer import NonFiniteLoss, Recipe
from dsee_scale.validate import launched_rank

RANK0_GRACE_S = 30.0


def main(argv: list[str] | None = None) -> int:
    """Run DSEE as the flags say; 0 when every stage finished, 2 on bad input (nothing started)."""
    try:
        cfg = train_config_from_argv(argv)
        recipe = Recipe(cfg)
        recipe.setup()
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, MissingExtra) as err:
        say_once(err)
        return 2
    try:
        recipe.run()
    except BaseException as err:
        # Leave at once: a collective clean-up would wait forever for ranks that are still
        # inside another collective; the launcher then stops every rank.
        if isinstance(err, (CheckpointError, NonFiniteLoss)):  # every rank raises it: one message
            say_once(err)
        else:
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    recipe.close()
    return 0


def say_once(err: BaseException) -> None:
    """An error every rank meets, said by rank 0. The launcher stops every rank as soon as one
    exits, so the others first give rank 0 RANK0_GRACE_S to say it (and are stopped with it); a
    rank that met it alone (a file missing on its node) then says it itself."""
    if launched_rank() == 0:
        print(f"dsee_scale: error: {err}", file=sys.stderr, flush=True)
        return
    time.sleep(RANK0_GRACE_S)
    print(f"dsee_scale: error (rank {launched_rank()}): {err}", file=sys.stderr, flush=True)


def leave(code: int) -> None:
    """End the process with `code` once its output is flushed, without the interpreter's
    teardown. DeepSpeed keeps references to the process groups that destroy_process_group cannot
    drop, so gloo's worker threads are still alive when Python frees its modules; freeing them
    then can abort in the C++ runtime (SIGABRT, "terminate called without an active exception",
    pytorch#190489) after a run that finished: two runs in one CI pass of the suite.
    Every file the run writes is closed by then (Recipe.close). After a finished run under
    mpirun, MPI is finalized first: mpirun counts a rank that leaves without MPI_Finalize as
    failed. Not after an error: MPI_Finalize would wait for ranks still in a collective."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")  # imported by DeepSpeed where ranks come from MPI
    if code == 0 and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)


def run() -> None:
    """The `dsee-train` console script."""
    leave(main())


if __name__ == "__main__":
    run()
