#!/usr/bin/env bash
# Multi-worker training with MultiWorkerMirroredStrategy: one process per worker,
# each with its own TF_CONFIG. Locally (default) all workers run on 127.0.0.1
# with free ports -- the same recipe as on N machines, and this script's own test.
#
#   launch/multi_worker.sh --num_workers=2 [--hosts=10.0.0.2:2222,10.0.0.3:2222 --index=0] [--dry_run] \
#       -- --data_dir=DATA --model_dir=RUN --model=xray_cnn --epochs=2
#
# Local mode starts every worker here and waits for all of them; with --hosts it
# starts only worker --index on this machine (run it once on each host).
# --install=cpu|gpu|tpu first installs TensorFlow, tf-keras and xraytpu here (run from the
# repository folder; the commands are launch/common.sh's INSTALL_*).
# Worker 0 is the chief: it writes the run directory; the others write to
# temporary directories that are removed at the end (see xraytpu.training.train_lib).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch/common.sh
source "$here/common.sh"

NUM_WORKERS=2; HOSTS=""; INDEX=""; LOG_DIR=""; PYTHON=${PYTHON:-python}; INSTALL=""
TRAIN_ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --num_workers=*) NUM_WORKERS=${1#*=} ;;
    --hosts=*) HOSTS=${1#*=} ;;
    --index=*) INDEX=${1#*=} ;;
    --log_dir=*) LOG_DIR=${1#*=} ;;
    --python=*) PYTHON=${1#*=} ;;
    --install=*) INSTALL=${1#*=} ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument: $1 (launcher flags first, then -- and the xraytpu.train flags)" ;;
  esac
  shift
done
[ ${#TRAIN_ARGS[@]} -gt 0 ] || die "no training flags: add -- --data_dir=... --model_dir=..."
case $INSTALL in
  "") ;;
  cpu) run bash -c "$INSTALL_CPU" ;;
  gpu) run bash -c "$INSTALL_GPU" ;;
  tpu) run bash -c "$INSTALL_TPU" ;;
  *) die "--install must be cpu, gpu or tpu" ;;
esac

if [ -z "$HOSTS" ]; then
  [[ "$NUM_WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--num_workers must be a positive integer"
  ports=$("$PYTHON" - "$NUM_WORKERS" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
  s.bind(("127.0.0.1", 0))
print(",".join(f"127.0.0.1:{s.getsockname()[1]}" for s in socks))
PY
)
  HOSTS=$ports
  LOCAL=1
else
  LOCAL=0
  [ -n "$INDEX" ] || die "--hosts needs --index (this machine's position in the list)"
  NUM_WORKERS=$(awk -F, '{print NF}' <<<"$HOSTS")
fi

workers_json=$(awk -F, '{for (i=1;i<=NF;i++) printf "%s\"%s\"", (i>1?",":""), $i}' <<<"$HOSTS")
tf_config() { printf '{"cluster":{"worker":[%s]},"task":{"type":"worker","index":%d}}' "$workers_json" "$1"; }

[ "$DRY_RUN" = 1 ] && LOG_DIR=${LOG_DIR:-/tmp/xraytpu-mw}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t xraytpu-mw-XXXX)}
[ "$DRY_RUN" = 1 ] || mkdir -p "$LOG_DIR"
if [ "$LOCAL" = 1 ]; then
  pids=()
  for ((i = 0; i < NUM_WORKERS; i++)); do
    echo "worker $i: TF_CONFIG=$(tf_config $i) log=$LOG_DIR/worker-$i.log"
    if [ "$DRY_RUN" = 1 ]; then
      run env TF_CONFIG="$(tf_config $i)" "$PYTHON" -m xraytpu.train --strategy=multi_worker "${TRAIN_ARGS[@]}"
    else
      TF_CONFIG=$(tf_config $i) "$PYTHON" -m xraytpu.train --strategy=multi_worker "${TRAIN_ARGS[@]}" \
        >"$LOG_DIR/worker-$i.log" 2>&1 &
      pids+=($!)
    fi
  done
  status=0
  for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then echo "worker $i: done"; else status=1; echo "worker $i: FAILED (see $LOG_DIR/worker-$i.log)"; tail -5 "$LOG_DIR/worker-$i.log" >&2; fi
  done
  exit $status
else
  run env TF_CONFIG="$(tf_config "$INDEX")" "$PYTHON" -m xraytpu.train --strategy=multi_worker "${TRAIN_ARGS[@]}"
fi
