"""What every command line of tfrecord_tools and xraytpu shares: flags from dataclasses, one runner.

Options are dataclasses whose fields carry their help text (`field`). An entry
point defines one absl flag per field with `define_flags(Options)`, at import
(or in its `run()` for modules that are libraries too), and builds the
dataclass back with `from_flags(Options)` inside `main`. So each default and
each help text is written once, in the dataclass the library takes; library
code never reads flags. A field without a default is a required flag.

`run(main)` starts a command (absl's `app.run`) and is the one place that
turns a user's mistake into one line, `<prog>: error: <message>`, and exit
code 2: a `tfrecord_tools.errors.UserError` (xraytpu's errors subclass it), a
bad or missing flag, unexpected arguments. An exception whose class sets an
integer `exit_code` (train's TrainingDiverged: 3) exits with that. Anything
else is a bug and keeps its traceback. README's "Exit codes" lists them all.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Iterable, Sequence, TypeVar

from absl import flags

from tfrecord_tools import errors

# Flags defined through this module belong to the module that calls
# define_flags (listed by its --help, and in README's reference under it).
flags.disclaim_key_flags()

EXIT_USER_ERROR = 2
T = TypeVar("T")
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def field(default: Any = dataclasses.MISSING, help: str = "",  # noqa: A002
          choices: Sequence[str] | None = None) -> Any:
  """A dataclass field carrying its flag help text (and enum choices); no default = required flag."""
  meta = {"help": help, "choices": tuple(choices) if choices else None}
  return dataclasses.field(default=default, metadata=meta)


def _type_of(f: dataclasses.Field) -> type:
  """The flag type of a field: str, int, float or bool (`X | None` counts as X)."""
  t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
  t = t.replace("Optional[", "").rstrip("]").split("|")[0].strip()
  if t not in _TYPES:
    raise TypeError(f"{f.name}: a flag needs a str, int, float or bool field, not {f.type!r}")
  return _TYPES[t]


def fields(cls: type, names: Iterable[str] | None = None) -> list[dataclasses.Field]:
  """The dataclass fields of `cls` that have help text (all of them, or `names`, in that order)."""
  by_name = {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}
  if names is None:
    return list(by_name.values())
  return [by_name[n] for n in names]


def define_flags(cls: type, names: Iterable[str] | None = None,
                 flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per field of the dataclass `cls` (or per field in `names`)."""
  fv = dict(flag_values=flag_values)
  for f in fields(cls, names):
    required = f.default is dataclasses.MISSING
    default = None if required else f.default
    help_, choices, kind = f.metadata["help"], f.metadata["choices"], _type_of(f)
    if choices:
      flags.DEFINE_enum(f.name, default, list(choices), help_, **fv)
    elif kind is bool:
      flags.DEFINE_bool(f.name, default, help_, **fv)
    elif kind is int:
      flags.DEFINE_integer(f.name, default, help_, **fv)
    elif kind is float:
      flags.DEFINE_float(f.name, default, help_, **fv)
    else:
      flags.DEFINE_string(f.name, default, help_, **fv)
    if required:
      flags.mark_flag_as_required(f.name, **fv)


def from_flags(cls: Callable[..., T], names: Iterable[str] | None = None,
               flag_values: flags.FlagValues = flags.FLAGS, **overrides) -> T:
  """Builds the dataclass from the parsed flags of its fields (or of `names`); overrides win."""
  values = {f.name: flag_values[f.name].value for f in fields(cls, names)}
  values.update(overrides)
  return cls(**values)


def explicit(names: Iterable[str], flag_values: flags.FlagValues = flags.FLAGS) -> set[str]:
  """The flags among `names` the user set (command line or flagfile), not left at their default."""
  return {n for n in names if flag_values[n].present}


def no_arguments(argv: Sequence[str]) -> None:
  """For commands that take flags only: positional arguments are a user error."""
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")


def prog() -> str:
  """The command's name as the user typed it: `python -m MODULE` -> MODULE, else argv[0]'s name."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name and not spec.name.endswith("__main__"):
    return spec.name
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def fail(message: Any, code: int = EXIT_USER_ERROR) -> None:
  """Prints `<prog>: error: <message>` as one line on stderr and exits with `code`."""
  text = " ".join(str(message).split("\n")).strip()
  print(f"{prog()}: error: {text}", file=sys.stderr, flush=True)
  sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad or missing flag reported like any user error."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (--helpfull lists the flags)")
    raise  # not reached


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
  """Runs `main` under absl (flags parsed, logging set up); user errors become one line + exit code."""
  from absl import app  # noqa: PLC0415

  def guarded(args: list[str]) -> Any:
    try:
      return main(args)
    except errors.UserError as e:
      fail(e)
    except Exception as e:  # noqa: BLE001 - only classes that name their exit code are caught
      code = getattr(type(e), "exit_code", None)
      if not isinstance(code, int):
        raise
      fail(e, code)

  app.run(guarded, argv=argv, flags_parser=_parse_flags)
