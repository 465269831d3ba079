"""absl flags generated from `xraytpu.config.Config`, so help text lives in one place.

An entry point calls `define_config_flags(names)` at import time for the
fields it accepts, then `config_from_flags(names)` inside `main`. This is
`tfrecord_tools.cli.define_flags` / `from_flags` for `Config`, plus the one
rule of its own: flags the user set explicitly override the augmentation
preset (`--augment`).
"""

from __future__ import annotations

from typing import Iterable

from absl import flags

from tfrecord_tools import cli
from xraytpu.config import AUGMENT_FIELDS, Config

# Flags defined here belong to the entry point that asks for them (its --help lists them).
flags.disclaim_key_flags()

AUGMENT_FLAG_FIELDS = ("augment",) + AUGMENT_FIELDS
ALL_FIELDS = tuple(f.name for f in cli.fields(Config))


def define_config_flags(names: Iterable[str] = ALL_FIELDS, required: Iterable[str] = (),
                        flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per named Config field (type, default and help from the field)."""
  cli.define_flags(Config, names, flag_values=flag_values)
  for name in required:
    flags.mark_flag_as_required(name, flag_values=flag_values)


def config_from_flags(names: Iterable[str] = ALL_FIELDS, flag_values: flags.FlagValues = flags.FLAGS,
                      **overrides) -> Config:
  """Builds the Config from parsed flags; explicit augmentation flags beat the preset."""
  names = tuple(names)
  cfg = cli.from_flags(Config, names, flag_values=flag_values, **overrides)
  if "augment" in names:
    explicit = cli.explicit((n for n in AUGMENT_FIELDS if n in names), flag_values=flag_values)
    cfg = cfg.resolve_augment(explicit)
  return cfg
