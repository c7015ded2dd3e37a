"""Is the Hugging Face hub reachable? One quick answer per process, so that offline lookups fail at once.

Without this, a hub id on a machine with no route to the hub makes ``huggingface_hub`` retry for
25-45 s before failing (measured, issue 19). qtulu resolves hub ids in three places
(`qtulu.model.load.resolve_checkpoint`, `qtulu.data.tokenizer`, `qtulu.data.sources`); each asks
`offline_reason` first and, when offline, reads the hub's local cache only (``local_files_only``)
and turns a miss into one `HubUnreachable` line::

    reason = offline_reason()              # None: online
    try:
        path = snapshot_download(repo, local_files_only=reason is not None)
    except Exception as e:
        if reason:
            raise unreachable(f"base model {repo!r}", reason) from e
        raise

Offline means: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE``) is set to
a true value, or a TCP connection to the hub's host (``HF_ENDPOINT``) does not open within
``QTULU_HUB_TIMEOUT`` seconds (default 3). The probe runs once per process; its answer is kept.
"""

from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlparse

from qtulu.errors import QtuluError

_TRUE = {"1", "true", "yes", "on"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_probe_result: str | None | bool = False  # False: not probed yet; None: reachable; str: why not


class HubUnreachable(QtuluError, ConnectionError):
    """A hub id was given but the hub cannot be reached (offline or no route); the message says which."""


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)


def offline_reason() -> str | None:
    """Why the hub is unusable (an env variable, or the failed probe), or None when it is reachable."""
    global _probe_result
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]}"
    if _probe_result is False:
        host, port = _endpoint()
        timeout = float(os.environ.get("QTULU_HUB_TIMEOUT", "3"))
        try:
            with socket.create_connection((host, port), timeout=timeout):
                _probe_result = None
        except OSError as e:
            _probe_result = f"no route to {host}:{port} ({type(e).__name__}: {e or 'timed out'})"
    return _probe_result


def unreachable(what: str, reason: str) -> HubUnreachable:
    """The one-line error for ``what`` (e.g. "base model 'org/name'") that is neither local nor cached."""
    return HubUnreachable(
        f"{what}: not a local path, not in the Hugging Face cache, and the hub is unreachable ({reason}); "
        "give a local directory/file instead, or go online"
    )


@contextlib.contextmanager
def cache_only(offline: bool = True):
    """While active (and ``offline``), ``datasets`` reads the hub cache only: a miss fails at once.

    ``datasets.load_dataset`` has no ``local_files_only``; it reads huggingface_hub's
    ``HF_HUB_OFFLINE`` (a module constant set from the environment at import), so the constant is
    switched for the duration of the call and restored after.
    """
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def reset() -> None:
    """Forget the probe's answer (tests; a long-lived process whose network changed)."""
    global _probe_result
    _probe_result = False
