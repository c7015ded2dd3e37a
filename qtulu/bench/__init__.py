"""End-to-end benchmarks (``qtulu bench e2e``): QLoRA training throughput, model FLOP utilization
and peak memory of qtulu against transformers + peft + bitsandbytes, LLaMA 7B to 65B shapes.

Modules: ``shapes`` (the model shapes), ``flops`` (FLOP accounting, GPU peaks), ``lengths`` (real
document lengths, packing and padded batching), ``build`` (random NF4 models built layer by layer),
``worker`` (one configuration in one process), ``e2e`` (orchestration), ``report`` (table, chart,
docs/benchmarks.md), ``cli`` (the command); ``harness`` (what every script in benchmarks/ stands on:
parser, timing, table, final JSON line, --record) and ``compile`` (the Triton kernels built for a
GPU architecture without a GPU). Importing this package imports no torch.
"""
