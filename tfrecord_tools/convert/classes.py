"""Stage 2, classes: the label order and the source class -> class mapping.

Sorted source class names, a normal/negative class first
(`default_class_order`), or --class_map ("NORMAL=Normal,PNEUMONIA=Bacterial+Viral":
its order is the label order; unnamed source classes are dropped and counted).
Every split must have the same classes (`resolve_classes`).
"""

from __future__ import annotations

import re
from typing import Sequence

from tfrecord_tools import labels as labels_lib
from tfrecord_tools.convert.find import Found
from tfrecord_tools.convert.options import ConvertError


def parse_class_map(spec: str) -> list[tuple[str, list[str]]]:
  """"NORMAL=Normal,PNEUMONIA=Bacterial+Viral,COVID" -> [(target, [sources])].

  A bare name keeps that class under its own name. Order is label order.
  """
  out: list[tuple[str, list[str]]] = []
  seen_targets, seen_sources = set(), {}
  for part in [p.strip() for p in spec.split(",") if p.strip()]:
    target, _, rhs = part.partition("=")
    target = target.strip()
    srcs = [s.strip() for s in (rhs.split("+") if rhs else [target])]
    if not target or not all(srcs):
      raise ConvertError(f"--class_map entry {part!r} is not NEW=OLD[+OLD...] or NAME")
    if target in seen_targets:
      raise ConvertError(f"--class_map names class {target!r} twice")
    for s in srcs:
      if s in seen_sources:
        raise ConvertError(f"--class_map maps source class {s!r} twice "
                           f"(to {seen_sources[s]!r} and {target!r})")
      seen_sources[s] = target
    seen_targets.add(target)
    out.append((target, srcs))
  if not out:
    raise ConvertError("--class_map is empty")
  return out


_NEGATIVE_NAMES = {"normal", "healthy", "negative", "benign", "control", "nofinding", "none"}


def _is_negative_name(name: str, others: Sequence[str]) -> bool:
  """Normal, Healthy, No_Finding, ...; or NonX / Non-X / No_X beside a class X."""
  key = re.sub(r"[-_ ]", "", name.lower())
  if key in _NEGATIVE_NAMES:
    return True
  others_keys = {re.sub(r"[-_ ]", "", o.lower()) for o in others if o != name}
  return any(key == prefix + o for o in others_keys for prefix in ("non", "no", "not"))


def default_class_order(names: Sequence[str]) -> list[str]:
  """Label order without --class_map: sorted, but a normal/negative class first.

  With two classes label 1 is the positive class of every clinical number
  (sensitivity, PPV, ROC), so it must be the finding: NonCOVID/COVID gives
  COVID = 1 although "COVID" sorts first. Only one class may look negative;
  otherwise the order stays alphabetical.
  """
  names = sorted(names)
  negative = [n for n in names if _is_negative_name(n, names)]
  if len(negative) != 1:
    return names
  return negative + [n for n in names if n != negative[0]]


def resolve_classes(found: Found, class_map: str) -> tuple[list[str], dict[str, str]]:
  """(class names in label order, source class -> class name; unmapped sources absent).

  Without --class_map the order is `default_class_order` (a normal/negative
  class first); --class_map's order is the label order.

  Raises ConvertError for a single class, for --class_map names that match no
  folder, and for splits whose classes differ.
  """
  source_classes = sorted({s.source_class for s in found.sources})
  if class_map:
    spec = parse_class_map(class_map)
    missing = [s for _, srcs in spec for s in srcs if s not in source_classes]
    if missing:
      raise ConvertError(f"--class_map names {', '.join(repr(m) for m in missing)} but the "
                         f"input's classes are {', '.join(source_classes)}"
                         + labels_lib.did_you_mean(missing, source_classes))
    classes = [t for t, _ in spec]
    mapping = {s: t for t, srcs in spec for s in srcs}
  else:
    classes = default_class_order(source_classes)
    mapping = {s: s for s in source_classes}
  if len(classes) < 2:
    if class_map:
      raise ConvertError(f"--class_map leaves only one class ({classes[0]}): need at least two")
    raise ConvertError(f"only one class ({classes[0]}) in {found.root}: a classifier needs at "
                       "least two class folders (input/<class>/* or input/<split>/<class>/*)")
  if found.layout == "splits":
    per_split = {sp: sorted({mapping[s.source_class] for s in found.sources
                             if s.split == sp and s.source_class in mapping})
                 for sp in found.splits}
    all_classes = set(classes)
    problems = []
    for sp, have in per_split.items():
      lacks = sorted(all_classes - set(have), key=classes.index)
      if lacks:
        problems.append(f"{sp} has no {', '.join(lacks)}")
    if problems:
      raise ConvertError("classes differ across splits: " + "; ".join(problems)
                         + " (every split needs the same class folders)")
  return classes, mapping
