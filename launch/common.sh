#!/usr/bin/env bash
# Shared helpers for the launchers (sourced, not run).
# `run CMD...` prints the command; with DRY_RUN=1 it only prints it.

DRY_RUN=${DRY_RUN:-0}

run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [ "$DRY_RUN" != 1 ]; then
    "$@"
  fi
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# need VAR_NAME FLAG: fail with a one-line message when a required setting is empty.
need() {
  local name=$1 flag=$2
  [ -n "${!name}" ] || die "missing $flag"
}

# The install commands, one place for every launcher (docs/workspace.md quotes them; tests/test_launch.py
# dry-runs each against the package index). Supported TensorFlow: 2.20 and 2.21; tf-keras must
# match TensorFlow's minor version, and goes in with --no-deps beside tensorflow-cpu/-tpu
# (it declares the full `tensorflow` wheel). Cloud TPU VMs get at most tensorflow-tpu 2.20.0,
# which brings libtpu and tensorboard 2.20 from the index. Run from the repository folder.
# shellcheck disable=SC2034  # used by the scripts that source this file
INSTALL_CPU="python3 -m pip install -q 'tensorflow-cpu~=2.21.0' && python3 -m pip install -q --no-deps 'tf-keras~=2.21.0' && python3 -m pip install -q '.[gcs]'"
# shellcheck disable=SC2034
INSTALL_GPU="python3 -m pip install -q '.[gpu,gcs]'"
# shellcheck disable=SC2034
INSTALL_TPU="python3 -m pip install -q 'tensorflow-tpu~=2.20.0' && python3 -m pip install -q --no-deps 'tf-keras~=2.20.0' && python3 -m pip install -q '.[gcs]'"
