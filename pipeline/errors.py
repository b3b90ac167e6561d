"""Error types that map to the CLI's exit codes.

``UserError`` is bad input (exit 2): its message is one line naming the thing that
is wrong and what would be valid. Anything else that escapes a command is a failure
while running (exit 1).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a missing path, an unknown config key, an unreadable model... (exit 2)."""


class JobFailed(Exception):
    """A run that started but could not finish (exit 1), e.g. too many bad images."""
