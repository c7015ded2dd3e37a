"""Errors of the data pipeline: a bad row (counted or fatal, by policy) and a bad source (always fatal)."""

from __future__ import annotations

from qtulu.errors import QtuluError


class DataError(QtuluError, ValueError):
    """A source or build problem that no policy can skip (missing file, unreadable JSON file, ...)."""


class BadRow(QtuluError, ValueError):
    """One malformed row. ``reason`` is a short key counted in the manifest (``"null_content"``, ...);
    ``detail`` is the human explanation; ``where`` (``file:line`` or ``source[index]``) is filled in
    by the loader that knows it."""

    def __init__(self, reason: str, detail: str = "", where: str | None = None):
        self.reason = reason
        self.detail = detail
        self.where = where
        super().__init__(self._message())

    def _message(self) -> str:
        loc = f"{self.where}: " if self.where else ""
        return f"{loc}{self.reason}" + (f": {self.detail}" if self.detail else "")

    def at(self, where: str) -> "BadRow":
        """The same error with its location set (``file:line`` or ``source[index]``)."""
        return BadRow(self.reason, self.detail, where)
