"""The planner's error (kept free of heavy imports: ``qtulu --help`` loads the CLI module)."""

from __future__ import annotations

from qtulu.errors import QtuluError


class PlanError(QtuluError, ValueError):
    """A plan that cannot be made (unknown shape, unreadable config, unsupported setting)."""
