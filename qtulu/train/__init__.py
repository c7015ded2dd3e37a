"""Stage 4, training: the run as named stages, the SFTTrainer subclass, callbacks, atomic checkpoints
and exact resume, the run lock, DDP / FSDP2, and the memory switches (dropout recompute, loss tiles,
activation offload, host master weights).
"""
