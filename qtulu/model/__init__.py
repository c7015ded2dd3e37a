"""Stage 3, the model: load a base (safetensors, a bitsandbytes checkpoint, an in-memory model), NF4
quantization, the packed-attention registration, the base's identity, hub access, threads.
"""
