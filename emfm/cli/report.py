"""How the emfm commands report the user's errors: one line `emfm: error: ...` and exit status 2,
never a traceback (EMFM_DEBUG=1 shows it too)."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

from emfm.errors import UserError

# Errors of the user's input (UserError: a bad config value, volume, checkpoint, zoo name, ...; a
# non-finite loss); anything else is a bug and keeps its traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, UserError, FloatingPointError)


@contextmanager
def user_errors(log: logging.Logger | None = None):
    """Report a user error raised inside in one line (also to `log`) and exit with status 2."""
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("EMFM_DEBUG"):
            raise
        if log is not None:
            log.error("%s: %s", type(e).__name__, e)
        print(f"emfm: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
