"""Errors a user causes and can fix: a bad path, config or artifact, a device that is not there.

Their message says what was wrong and what to do. The `ace` command prints it as one line and
exits with status 2; any other exception is a bug and shows its traceback (docs/internals.md).
The concrete errors also derive from the built-in type callers caught before (ValueError,
FileNotFoundError, RuntimeError), so `except ValueError` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors a user can fix; the message says how."""


class InputError(UserError, ValueError):
    """A value, file content or combination of options the user gave cannot be used."""


class ImageDecodeError(InputError):
    """Input that is not a usable image; kind: unsupported | corrupt | multiframe | too_large."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
