"""Free TCP ports on 127.0.0.1, for tests that start local worker clusters."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
  """n distinct ports free right now (bound together, then released)."""
  socks = [socket.socket() for _ in range(n)]
  try:
    for s in socks:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()
