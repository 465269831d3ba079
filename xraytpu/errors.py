"""The one user-error base class of xraytpu.

Subclasses `tfrecord_tools.errors.UserError`, so the shared entry-point runner
catches the errors of both packages in one place.
"""

from __future__ import annotations

from tfrecord_tools import errors as _tools_errors


class UserError(_tools_errors.UserError):
  """A mistake the user can fix (missing run, bad flag, data that does not match)."""
