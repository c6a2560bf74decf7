"""Errors of the user's input. The CLI reports a `UserError` in one line that names the culprit (and
the setting that fixes it); any other exception is a bug of emfm and is shown with its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: a config value, a path, a volume's shape or dtype, a checkpoint that does not fit.
    A ValueError, so code that catches ValueError keeps working."""
