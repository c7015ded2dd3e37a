"""The one base class of every error qtulu raises on purpose.

Every error that means "the user's input or environment is wrong" (a recipe key, a data row, an
adapter that does not fit, a missing file) derives from `QtuluError`. The CLI (`qtulu.cli.main`)
prints such an error as one line on stderr and exits with status 2; ``--debug`` shows the
traceback instead. Each concrete class also keeps the builtin base it had before (``ValueError``,
``RuntimeError``, ...) so that ``except ValueError`` in user code keeps working.

This module imports nothing, so that every layer (data, model, train, evals) may import it
without breaking the one-way flow recipe -> data -> model -> train -> adapter -> eval/merge.
"""

from __future__ import annotations


class QtuluError(Exception):
    """An error qtulu reports to the user as one line (exit 2), not as a traceback."""


# Errors raised by more than one module of a stage live here, so that the modules that raise them
# need not import each other (an error class is the usual root of an import cycle).


class AdapterError(QtuluError, ValueError):
    """An adapter directory is corrupt, incomplete or bound to another base/quantization."""


class ExportError(QtuluError, ValueError):
    """An adapter/base pair that cannot be merged (unsupported adapter kind, keys not matching)."""


def one_line(err: BaseException) -> str:
    """``err`` as one line: its message with newlines folded (a KeyError's quotes removed)."""
    if isinstance(err, KeyError) and err.args:
        msg = str(err.args[0])
    else:
        msg = str(err) or type(err).__name__
    return " ".join(part.strip() for part in msg.splitlines() if part.strip())
