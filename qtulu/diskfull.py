"""Tell a full disk from other write failures.

On a full disk the libraries that write checkpoints do not all raise ``OSError(ENOSPC)``:
safetensors raises its own ``SafetensorError("... No space left on device (os error 28)")`` and
torch's zip writer a ``RuntimeError("[enforce fail at inline_container.cc] unexpected pos ...")``
that does not mention the disk at all. `is_disk_full` looks at the exception chain for ENOSPC /
EDQUOT or their messages, and, failing that, at the free space left where the write went.
"""

from __future__ import annotations

import errno
import os
import shutil

NEARLY_FULL_BYTES = 4 << 20  # a write that failed with less than this free is taken as "disk full"


def is_disk_full(exc: BaseException, path: str | os.PathLike) -> bool:
    """True when ``exc`` (raised while writing under ``path``) was caused by a full disk or quota."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    try:
        probe = os.fspath(path)
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        return shutil.disk_usage(probe).free < NEARLY_FULL_BYTES
    except OSError:
        return False
