"""Read a (sharded) safetensors checkpoint one tensor at a time, by the model's parameter names.

Shared by the streamed load (`qtulu.model.load`) and the streamed merge export
(`qtulu.adapters.export`): both walk a model's parameters and read each tensor once, so neither
holds more than one tensor of the checkpoint in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qtulu.errors import QtuluError


class CheckpointReader:
    """The tensors of ``files`` by parameter name. A name is found as stored, or without the
    model's ``prefix`` (``model.``): a bare-backbone checkpoint (LlamaModel keys) loads into a
    causal-LM skeleton. An unreadable file raises ``error`` naming it."""

    def __init__(self, files: list[Path], prefix: str, error: type[QtuluError]):
        self.prefix = prefix + "."
        self.key_to_file: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        from safetensors import safe_open

        self._open = safe_open
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as fh:
                    for k in fh.keys():
                        self.key_to_file[k] = f
            except Exception as e:  # noqa: BLE001 - safetensors' own error type: one line naming the file
                raise error(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from e

    def key(self, name: str) -> str | None:
        """The checkpoint's key for parameter ``name``, or None when the checkpoint lacks it."""
        if name in self.key_to_file:
            return name
        if name.startswith(self.prefix) and name[len(self.prefix):] in self.key_to_file:
            return name[len(self.prefix):]
        return None

    def read(self, name: str) -> torch.Tensor:
        """The tensor of parameter ``name`` (on the CPU); each file is opened once."""
        key = self.key(name)
        f = self.key_to_file[key]
        if f not in self._handles:
            self._handles[f] = self._open(str(f), framework="pt", device="cpu")
        return self._handles[f].get_tensor(key)

    def close(self) -> None:
        self._handles.clear()
