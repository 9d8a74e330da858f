"""dsee_scale: DSEE (Dually Sparsity-embedded Efficient Tuning) on DeepSpeed ZeRO-3."""
from dsee_scale.config import DSEEConfig
from dsee_scale.export import load_adapter, save_adapter
from dsee_scale.inject import (
    apply_dsee,
    count_parameters,
    dsee_layers,
    dsee_state_dict,
    load_dsee_state_dict,
    mark_only_dsee_as_trainable,
    support_of,
)
from dsee_scale.layer import DSEELayer

__all__ = [
    "DSEEConfig",
    "DSEELayer",
    "apply_dsee",
    "count_parameters",
    "dsee_layers",
    "dsee_state_dict",
    "load_adapter",
    "load_dsee_state_dict",
    "mark_only_dsee_as_trainable",
    "save_adapter",
    "support_of",
]
__version__ = "0.1.0"
