#!/usr/bin/env bash
# Recovery time: tailgate (release) buffers about a million spans that cannot decide yet (every
# trigger 10 minutes out), gets kill -9, and restarts on the same [storage] dir. Prints the
# spans acknowledged, the time from the restart to the end of the replay (its log line) and to
# /readyz answering 200, and tailgate_storage_recovered_spans_total.
#
# Run: bash benches/recovery.sh [rate spans/s, default 100000] [seconds, default 11]
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-100000}
SECS=${2:-11}
cargo build --release -q -p tailgate
BIN=$PWD/target/release/tailgate
WORK=$(mktemp -d)
PID=
cleanup() { [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

cat > "$WORK/tailgate.toml" <<TOML
[receivers]
grpc = "127.0.0.1:0"
http = "127.0.0.1:0"
[admin]
endpoint = "127.0.0.1:0"
[buffer]
max_buffer_bytes = "8GiB"
root_grace = "10m"
trace_idle = "10m"
decision_wait = "10m"
[decide]
default = "keep"
[exporter]
type = "file"
path = "$WORK/traces.jsonl"
[storage]
dir = "$WORK/storage"
TOML

# Starts tailgate with its log in $1; sets PID, GRPC and ADMIN from the log.
start() {
  "$BIN" run --config "$WORK/tailgate.toml" > "$1" 2>&1 &
  PID=$!
  for _ in $(seq 600); do
    GRPC=$(sed -n 's/.*grpc listening on \([0-9.:]*\).*/\1/p' "$1" | head -1)
    ADMIN=$(sed -n 's/.*admin listening on \([0-9.:]*\).*/\1/p' "$1" | head -1)
    [ -n "$GRPC" ] && [ -n "$ADMIN" ] && return 0
    sleep 0.05
  done
  echo "tailgate did not start:"; cat "$1"; exit 1
}

start "$WORK/run1.log"
"$BIN" loadgen --endpoint "http://$GRPC" --rate "$RATE" --duration "${SECS}s" \
  --connections 4 --quiet > "$WORK/loadgen.json"
ACKED=$(python3 -c "import json;print(json.load(open('$WORK/loadgen.json'))['spans_accepted'])")
sleep 0.5
kill -9 "$PID"; wait "$PID" 2>/dev/null || true
BYTES=$(du -sb "$WORK/storage" | cut -f1)

T0=$(date +%s.%N)
start "$WORK/run2.log"
python3 - "$ADMIN" <<'PY'
import sys, time, urllib.request
while True:
    try:
        if urllib.request.urlopen(f"http://{sys.argv[1]}/readyz", timeout=1).status == 200:
            break
    except Exception:
        pass
    time.sleep(0.02)
PY
T1=$(date +%s.%N)
REPLAY_MS=$(sed -n 's/.*replayed the storage log.*elapsed_ms=\([0-9]*\).*/\1/p' "$WORK/run2.log" | head -1)
sleep 2
RECOVERED=$(python3 - "$ADMIN" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics").read().decode()
print(sum(float(l.split()[-1]) for l in text.splitlines()
          if l.startswith("tailgate_storage_recovered_spans_total")))
PY
)
python3 - <<PY
print(f"acknowledged spans:        {int($ACKED):,}")
print(f"log on disk at the kill:   {int($BYTES) / 2**20:.0f} MiB")
print(f"replay (log line):         {int('${REPLAY_MS:-0}') / 1000:.2f} s")
print(f"restart to /readyz 200:    {$T1 - $T0:.2f} s")
print(f"recovered spans (metric):  {int(float('$RECOVERED')):,}")
PY
