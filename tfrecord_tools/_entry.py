"""Start-up of the tfrecord_tools commands that are libraries too (inspect, synthetic).

Their absl flags are defined when the command runs, never on import: tests,
benchmarks and other entry points import `tfrecord_tools.synthetic` or
`tfrecord_tools.inspect` as libraries, and importing must not add flags to
theirs (or collide with a flag name of their own).
"""

from __future__ import annotations

from typing import Callable, Sequence


def run_command(define_flags: Callable[[], None], main: Callable[[Sequence[str]], None], *,
                tensorflow: bool = False) -> None:
  """Defines the command's flags, then runs `main` with the shared runner (`tfrecord_tools.cli.run`)."""
  from tfrecord_tools import cli
  define_flags()
  cli.run(main, tensorflow=tensorflow)
