"""The CLI's user-error type (kept import-light: no Lightning, no matplotlib)."""

from __future__ import annotations

__all__ = ["CLIError", "RunsNotFoundError"]


class CLIError(ValueError):
    """A mistake in the command line or the config: reported as one line, exit status 2."""


class RunsNotFoundError(CLIError, FileNotFoundError):
    """``report`` found no folder or no TensorBoard event files where it was pointed."""
