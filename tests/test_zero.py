"""zero.py helpers that need no process group."""
import types

import deepspeed
import pytest
import torch
from torch import nn

from dsee_scale import zero


def test_keep_whole_refuses_a_deepspeed_without_its_persistence_internals():
    param = nn.Parameter(torch.zeros(3))
    param.ds_id, param.ds_persist = 0, False  # looks partitioned, not yet persistent
    engine = types.SimpleNamespace(optimizer=object())  # no persistent_parameters list
    with pytest.raises(RuntimeError, match=f"deepspeed {deepspeed.__version__}"):
        zero.keep_whole(engine, [param])
    zero.keep_whole(engine, [nn.Parameter(torch.zeros(3))])  # nothing partitioned: nothing to do
