"""DSEE fine-tuning entry point from a checkout; the same program as the `dsee-train` console
script (dsee_scale/cli.py, which lists every launcher's command line):

    deepspeed --num_gpus 2 --bind_cores_to_rank launch/train.py --ds_config ds_configs/zero3.json
    torchrun --nproc_per_node 2 launch/train.py ...
    mpirun -np 2 python launch/train.py ...
    accelerate launch --config_file launch/accelerate/zero3.yaml launch/train.py ...
"""
from dsee_scale.cli import run

if __name__ == "__main__":
    run()
