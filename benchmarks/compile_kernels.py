"""Compile every autotune config of qtulu's Triton kernels for a CUDA architecture, without a GPU:
compile errors, shared memory, registers and spills per config (``qtulu.bench.compile``).

    python benchmarks/compile_kernels.py                  # sm_90 (H100/H200), bf16
    python benchmarks/compile_kernels.py --arch 90 --dtype float16 --kernels nf4

Prints a table and a final JSON line; exit status 1 if any config failed to compile.
"""

from qtulu.bench.compile import main  # sets TRITON_INTERPRET aside before triton is imported

if __name__ == "__main__":
    raise SystemExit(main())
