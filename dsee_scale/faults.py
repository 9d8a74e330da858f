"""Failures a test can ask a run for, by DSEE_FAULT_INJECT (the only reader of it): a kill or a
full disk in the middle of a checkpoint, a NaN loss at one step. Without it nothing happens."""
from __future__ import annotations

import errno
import os
import signal

import torch

FAULT_ENV = "DSEE_FAULT_INJECT"  # "kill_during_save:<tag>", "enospc_during_save:<tag>", "nan_loss:<stage>-<step>"


def _asked(fault: str, where: str) -> bool:
    return os.environ.get(FAULT_ENV, "") == f"{fault}:{where}"


def during_save(tag: str) -> None:
    """Between two files of checkpoint `tag`: the process is killed, or the disk is full."""
    if _asked("kill_during_save", tag):
        os.kill(os.getpid(), signal.SIGKILL)
    if _asked("enospc_during_save", tag):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def training_loss(loss: torch.Tensor, stage: str, step: int) -> torch.Tensor:
    """The loss of `stage` step `step` (counted from 1), NaN where a test asks for it."""
    return loss * float("nan") if _asked("nan_loss", f"{stage}-{step}") else loss
