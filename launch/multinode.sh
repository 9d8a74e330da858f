#!/usr/bin/env bash
# Multi-node DSEE with the DeepSpeed launcher:
#   launch/multinode.sh RECIPE [HOSTFILE] [extra launch/train.py flags]
# Uses ssh from this node to every host in HOSTFILE (default launch/hostfile). Without ssh, run on
# every node:  deepspeed --hostfile H --no_ssh --node_rank N --master_addr FIRST_HOST launch/train.py --config RECIPE
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=${1:?usage: launch/multinode.sh RECIPE [HOSTFILE] [flags]}
hostfile=${2:-launch/hostfile}
shift $(( $# >= 2 ? 2 : 1 ))
export NCCL_ASYNC_ERROR_HANDLING=1
exec deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" launch/train.py --config "$recipe" "$@"
