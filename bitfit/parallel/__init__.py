"""More than one process. train.py loads these only under torchrun or --shard-weights, so a run in one
process never imports them, and a fork that deletes this folder still trains.

    torchrun   joining torchrun's process group (the data-parallel all-reduce itself is bitfit.core.step's)
    sharding   --shard-weights: FSDP2 splits the frozen weights between the processes; the biases stay whole
"""
