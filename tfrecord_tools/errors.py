"""The one user-error base class of tfrecord_tools.

Every error a user can cause (a bad flag, a missing folder, a corrupt file
named on the command line) is a subclass of `UserError`. The shared entry-point
runner (`tfrecord_tools.cli`) catches it once and prints one line; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
  """A mistake the user can fix; its message is one line meant for them."""


class ImageError(UserError):
  """The bytes are not a usable image; `reason` is a short human-readable cause."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason
