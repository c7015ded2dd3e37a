"""End-to-end QLoRA training benchmark: a thin wrapper over `qtulu bench e2e`.

    python benchmarks/bench_e2e.py --shape llama-7b --seq-len 4096 --steps 10 --record
    python benchmarks/bench_e2e.py --shape llama-65b --seq-len 2048 --configs qtulu,baseline
    python benchmarks/bench_e2e.py --shape tiny --seq-len 128 --steps 2     # CPU smoke run

Prints a table and a final JSON line; `--record` appends a dated section to docs/benchmarks.md.
"""

from __future__ import annotations

import sys

from qtulu.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "e2e", *sys.argv[1:]]))
