"""The one place that knows DeepSpeed ZeRO-3's internals (ds_tensor, ds_shape, ds_status, ...).

`shards` reads and edits parameters one matrix or one shard at a time; `patches` is what an engine
build applies; `single_host` holds the CPU shared-memory paths; `compat` every other private
attribute and the start-up probe. A DeepSpeed upgrade is this package's work alone.
"""
from dsee_scale.zero.patches import (
    TorchLinear,
    hook_per_block,
    hook_per_layer,
    keep_whole,
    torch_linear_where_whole,
    whole_model,
    whole_model_fits,
)
from dsee_scale.zero.shards import (
    check_created_like,
    edit_local_shard,
    full_dtype,
    full_numel,
    full_shape,
    gather_to,
    gathered,
    init_context,
    is_partitioned,
    is_whole,
    local_shard,
    on_nvme_count,
    partition_new_parameters,
    partition_of,
    scatter_from,
    shard_device,
    shard_in_memory,
    shard_range,
    shares_memory,
    zero3_active,
)
from dsee_scale.zero.single_host import can_share_frozen_weights, share_frozen_weights, with_fetch_defaults

__all__ = [
    "TorchLinear", "can_share_frozen_weights", "check_created_like", "edit_local_shard", "full_dtype", "full_numel", "full_shape",
    "gather_to", "gathered", "hook_per_block", "hook_per_layer", "init_context", "is_partitioned", "is_whole", "keep_whole", "local_shard",
    "on_nvme_count", "partition_new_parameters", "partition_of", "scatter_from", "shard_device", "shard_in_memory", "shard_range",
    "share_frozen_weights", "shares_memory", "torch_linear_where_whole", "whole_model", "whole_model_fits", "with_fetch_defaults",
    "zero3_active",
]
