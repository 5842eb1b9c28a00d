"""Tensor parallelism: one model split across N processes (`--tp N`) with torch.distributed and DTensor.

`launch.py` starts the N processes (torchrun's elastic agent) when the user did not; `tensor_parallel.py`
joins the process group, shards the meta-initialised Transformer with `parallelize_module` and gives each
rank only its slice of the checkpoint."""
