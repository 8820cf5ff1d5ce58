"""UserError: what an application raises for a problem the user fixes (a package to install), so that the command
line reports it in one line with exit status 2, as it does ValueError and FileNotFoundError. Every other exception is
a bug and keeps its traceback."""

from __future__ import annotations


class UserError(RuntimeError):
    """A problem on the user's side that the message says how to fix (a RuntimeError, so that callers that caught
    the RuntimeError these errors used to be keep working)."""
