"""A fork server for benchmark configurations: ``python -m qtulu.bench.server [--preload]``.

For each request it forks a fresh child that runs one configuration, so that every configuration
gets its own process (its own CUDA context and peak memory). With ``--preload`` (CPU runs) it
imports torch, transformers, peft, bitsandbytes and qtulu's kernels once (``worker``) so that a
child pays no import time (~10 s on a 2-core CPU). Never with a GPU: importing bitsandbytes
initializes CUDA (it reads the device capability), and a forked child cannot use CUDA
initialized in its parent; there each child imports everything after the fork.
multiprocessing's "forkserver" would do the same but re-imports the caller's ``__main__`` script
in every child, which breaks unguarded scripts and pytest runners.

Protocol (one line each, tab-separated on stdin, JSON on stdout): request ``SPEC\\tRESULT``;
replies ``{"pid": N}`` once the child runs, then ``{"exitcode": N}``. Children write their own
stdout to stderr so that stdout carries the protocol only. EOF on stdin ends the server.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--preload" in argv:
        import torch

        from qtulu.bench import worker  # noqa: F401  (the heavy preload)

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            raise SystemExit("qtulu.bench.server: --preload initialized CUDA; forked children could not use it")
    proto = sys.stdout
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line:
            continue
        spec_path, result_path = line.split("\t")
        proto.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                os.dup2(2, 1)  # the child's prints must not mix into the protocol
                sys.stdout = sys.stderr
                from qtulu.bench.worker import child_main

                child_main(spec_path, result_path)
                code = 0
            except BaseException:  # the parent reads the missing result file and the exit code
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        proto.write(json.dumps({"pid": pid}) + "\n")
        proto.flush()
        _, status = os.waitpid(pid, 0)
        proto.write(json.dumps({"exitcode": os.waitstatus_to_exitcode(status)}) + "\n")
        proto.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
