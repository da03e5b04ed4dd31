"""Trainer pieces, counterparts of torchtitan's components/: checkpointing with the run
identity, block-wise metrics, validation, the optimizer's embedding learning rate, the
chunked / fused linear cross-entropy, and small distributed helpers."""
