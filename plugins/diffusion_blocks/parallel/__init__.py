"""Parallelisation: FSDP2 primitives (fsdp.py), the families' parallelize functions
(parallelize.py) and block-parallel training (block_parallel.py)."""
