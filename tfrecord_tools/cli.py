"""What every command line of tfrecord_tools and xraytpu shares: flags from dataclasses, one runner.

Options are dataclasses whose fields carry their help text (`field`). An entry
point defines one absl flag per field with `define_flags(Options)`, at import
(or in its `run()` for modules that are libraries too), and builds the
dataclass back with `from_flags(Options)` inside `main`. So each default and
each help text is written once, in the dataclass the library takes; library
code never reads flags. A field without a default is a required flag.

Help: `--help` (also `-h`, `--helpshort`) prints the command's docstring and its
own flags grouped by topic, and exits 0, the same whether the command runs as
`python -m MODULE` or as an installed console script (absl's own --help lists
only the flags of the `__main__` module, which for a console script is the
generated wrapper: nothing). A dataclass names the topics of its fields with
`FLAG_TOPICS = {"topic": ("field", ...)}` or one `FLAG_TOPIC` for all of them.
A renamed flag keeps its old spelling working through `FLAG_ALIASES = {"old": "field"}`:
it is accepted with a one-line deprecation warning.

`run(main)` starts a command (absl's `app.run`) and is the one place that
turns a user's mistake into one line, `<prog>: error: <message>`, and exit
code 2: a `tfrecord_tools.errors.UserError` (xraytpu's errors subclass it), a
bad or missing flag, unexpected arguments, and an output the machine refused to
write, whichever library call wrote it: an `OSError` with an errno of
`errors.WRITE_HINTS` (read-only folder or file system, disk full, quota), or a
TensorFlow / h5py error that names one, becomes `cannot write PATH: <cause>
(<ERRNO>); <what to do>` (`errors.os_error_line`; other OSErrors keep their
traceback). An exception whose class sets an integer `exit_code` (train's
TrainingDiverged: 3) exits with that. Anything else is a bug and keeps its traceback. docs/cli.md's "Exit codes" lists them all.

`run(main, tensorflow=True)`, for the commands that need TensorFlow, imports it
first and filters the process's stderr (file descriptor 2, so C++ writes too)
through a thread that drops TensorFlow's notices (`TF_NOISE`: oneDNN and
CPU-feature notes, absl's "before InitializeLog" banner, graph-optimizer notes,
which TensorFlow 2.21 writes from C++ whatever TF_CPP_MIN_LOG_LEVEL says), and
quiets TensorFlow's Python INFO lines. Everything else still shows, in order;
`-v=1` (absl's --verbosity) brings the notices back, as does TF_CPP_MIN_LOG_LEVEL=0.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import sys
import threading
from typing import Any, Callable, Iterable, Sequence, TypeVar

from absl import flags

from tfrecord_tools import errors

# Flags defined through this module belong to the module that calls
# define_flags (listed by its --help, and in docs/cli.md's reference under it).
flags.disclaim_key_flags()

EXIT_USER_ERROR = 2
T = TypeVar("T")
HELP_FLAGS = ("--help", "-h", "--helpshort", "-?")
# flag name -> its help topic, filled by define_flags (flags defined by hand: the command's own)
_TOPIC_OF: dict[str, str] = {}
# What to install when TensorFlow or tf-keras is missing (docs/workspace.md has the details).
INSTALL_HINT = ("install TensorFlow and tf-keras for this machine: CPU: pip install "
                "'xraytpu[cpu]' && pip install --no-deps 'tf-keras~=2.21.0'; GPU: pip install "
                "'xraytpu[gpu]'; Cloud TPU VM: pip install 'xraytpu[tpu]' && pip install --no-deps "
                "'tf-keras~=2.20.0' (docs/workspace.md)")
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
# Lines TensorFlow writes to stderr that say nothing about the user's run (a line is dropped
# when it contains one of these).
TF_NOISE = ("All log messages before absl::InitializeLog() is called",
            "oneDNN custom operations are on",
            "This TensorFlow binary is optimized to use available CPU instructions",
            "To enable the following instructions:",
            "oneDNN supports DT_UINT8 only on platforms with AVX-512",
            "Skipping loop optimization for Merge node with control input")


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
  topics = getattr(cls, "FLAG_TOPICS", {})
  for f in fields(cls, names):
    _TOPIC_OF[f.name] = next((t for t, members in topics.items() if f.name in members),
                             getattr(cls, "FLAG_TOPIC", "options"))
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
  for old, new in getattr(cls, "FLAG_ALIASES", {}).items():
    if names is None or new in names:
      flags.DEFINE_string(old, None, f"Deprecated spelling of --{new} (still accepted).", **fv)
      _TOPIC_OF[old] = _TOPIC_OF.get(new, "options")


def _aliased(cls: type, values: dict, flag_values: flags.FlagValues) -> dict:
  """Takes each deprecated spelling the user gave (`cls.FLAG_ALIASES`: old -> field) for its
  field, with one warning line on stderr; both spellings at once is a user error."""
  for old, new in getattr(cls, "FLAG_ALIASES", {}).items():
    if new not in values or old not in flag_values or flag_values[old].value is None:
      continue
    if flag_values[new].present:
      raise errors.UserError(f"--{old} and --{new} are one option (--{old} is its old name): "
                             f"give only --{new}")
    print(f"warning: --{old} is deprecated; use --{new}", file=sys.stderr)
    values[new] = flag_values[old].value
  return values


def from_flags(cls: Callable[..., T], names: Iterable[str] | None = None,
               flag_values: flags.FlagValues = flags.FLAGS, **overrides) -> T:
  """Builds the dataclass from the parsed flags of its fields (or of `names`); overrides win."""
  values = {f.name: flag_values[f.name].value for f in fields(cls, names)}
  values = _aliased(cls, values, flag_values)
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
  name = spec.name.removesuffix(".__main__") if spec is not None and spec.name else ""
  if name and name != "__main__":   # a package's __main__.py: the package (`python -m PACKAGE`)
    return name
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


def help_text(doc: str = "", flag_values: flags.FlagValues = flags.FLAGS) -> str:
  """The command's docstring, then its flags grouped by topic (absl's own flags left out)."""
  import textwrap  # noqa: PLC0415
  groups: dict[str, list] = {}
  for module, module_flags in flag_values.flags_by_module_dict().items():
    if module.startswith("absl") or module.startswith("tensorflow"):
      continue
    for fl in module_flags:
      groups.setdefault(_TOPIC_OF.get(fl.name, prog()), []).append(fl)
  lines = [textwrap.dedent(doc).strip(), ""] if doc and doc.strip() else []
  lines.append(f"usage: {prog()} [--flag=value ...]   (--flagfile=FILE: one --flag=value per line)")
  for topic, group in groups.items():
    lines += ["", f"{topic}:"]
    for fl in sorted({f.name: f for f in group}.values(), key=lambda f: f.name):
      name = f"--[no]{fl.name}" if fl.boolean else f"--{fl.name}"
      default = "" if fl.default is None else f" (default: {fl.default_as_str or repr(fl.default)})"
      lines += textwrap.wrap(f"{name}: {fl.help}{default}", width=100, initial_indent="  ",
                             subsequent_indent="      ")
  lines += ["", "--helpfull: every flag, absl's included."]
  return "\n".join(lines)


def not_installed(module: str | None) -> str:
  """The one line for a missing TensorFlow or tf-keras: which, and the install commands."""
  return f"{module or 'tensorflow'} is not installed: {INSTALL_HINT}"


def _missing_tensorflow(e: ImportError) -> bool:
  return (getattr(e, "name", None) or "").split(".")[0] in ("tensorflow", "tf_keras")


def filter_stderr(noise: Sequence[str]) -> None:
  """From now until exit, lines written to file descriptor 2 (Python's and C++'s) that
  contain one of `noise` are dropped; the rest pass through in order.

  fd 2 becomes a pipe read by a daemon thread that writes to the real stderr; at exit the
  pipe is closed and the thread drains it (absl prints an uncaught traceback before that)."""
  sys.stderr.flush()
  real = os.dup(2)
  read_end, write_end = os.pipe()
  os.dup2(write_end, 2)
  os.close(write_end)
  marks = tuple(n.encode() for n in noise)

  def pump():
    pending = b""
    while chunk := os.read(read_end, 1 << 16):
      *lines, pending = (pending + chunk).split(b"\n")
      out = b"".join(line + b"\n" for line in lines if not any(m in line for m in marks))
      if out:
        os.write(real, out)
    if pending:
      os.write(real, pending)

  thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
  thread.start()

  def finish():
    sys.stderr.flush()
    os.dup2(real, 2)            # closes the pipe's last write end: the thread reads to its end
    thread.join(timeout=2.0)
  atexit.register(finish)


def import_tensorflow(verbose: bool = False) -> None:
  """Imports TensorFlow for a command that needs it, its notices filtered (module docstring)."""
  if "tensorflow" in sys.modules:
    return
  if not verbose and os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0":
    filter_stderr(TF_NOISE)
  import tensorflow  # noqa: F401, PLC0415
  if not verbose:
    logging.getLogger("tensorflow").setLevel(logging.WARNING)


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None, *,
        tensorflow: bool = False) -> None:
  """Runs `main` under absl (flags parsed, logging set up); user errors become one line + exit code.

  tensorflow=True: the command needs TensorFlow; it is imported first, quietly
  (`import_tensorflow`), and a missing install is one line."""
  from absl import app  # noqa: PLC0415

  args = sys.argv if argv is None else argv
  if any(a in HELP_FLAGS for a in args[1:]):
    module = sys.modules.get(getattr(main, "__module__", ""), None)
    print(help_text(getattr(module, "__doc__", "") or ""))
    sys.exit(0)

  def guarded(args: list[str]) -> Any:
    try:
      if tensorflow:
        import_tensorflow(verbose=flags.FLAGS["verbosity"].value >= 1)
      return main(args)
    except errors.UserError as e:
      fail(e)
    except ImportError as e:   # xraytpu._keras's own error is a UserError, caught above
      if not _missing_tensorflow(e):
        raise
      fail(not_installed(e.name))
    except Exception as e:  # noqa: BLE001 - only write failures and classes that name their
      # exit code are caught: an output the machine refused (read-only, disk full, quota) is
      # one line; anything else is a bug and keeps its traceback.
      line = errors.os_error_line(e)
      if line is not None:
        fail(line)
      code = getattr(type(e), "exit_code", None)
      if not isinstance(code, int):
        raise
      fail(e, code)

  app.run(guarded, argv=argv, flags_parser=_parse_flags)
