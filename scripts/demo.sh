#!/usr/bin/env bash
# make demo: start a server on the embedded model, generate through the CLI with previews,
# stop the server (SIGTERM, graceful drain), and say where the files are.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT="${PORT:-50071}"
OUT="${OUT:-demo-output}"
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== starting stepserve on 127.0.0.1:$PORT (log: $OUT/server.log)"
"$BIN/stepserve" serve --host 127.0.0.1 --port "$PORT" >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
if ! "$BIN/stepserve-client" --target "127.0.0.1:$PORT" health --wait 180; then
  echo "server did not become ready; last log lines:" >&2
  tail -20 "$OUT/server.log" >&2
  exit 1
fi
"$BIN/stepserve-client" --target "127.0.0.1:$PORT" models

echo "== one image, with a preview every step"
"$BIN/stepserve-client" --target "127.0.0.1:$PORT" generate "a small red circle on the left" \
  --seed 1 -o "$OUT/red-circle.png" --previews "$OUT/previews"

echo "== four images of another prompt, and two more prompts at the same time (batched together)"
"$BIN/stepserve-client" --target "127.0.0.1:$PORT" generate "a large blue square at the top" \
  --seed 7 --num-images 4 -o "$OUT/blue-square.png" &
A=$!
"$BIN/stepserve-client" --target "127.0.0.1:$PORT" generate "a green triangle in the middle" \
  --seed 3 --sampler dpm_solver_multistep -o "$OUT/green-triangle.png" &
B=$!
"$BIN/stepserve-client" --target "127.0.0.1:$PORT" generate "a small yellow circle at the bottom" \
  --seed 5 --sampler euler_ancestral -o "$OUT/yellow-circle.png" &
C=$!
wait $A $B $C

echo "== stopping the server"
kill -TERM $SERVER
wait $SERVER || true
trap - EXIT
echo
echo "Done. Images are in $OUT/:"
ls -1 "$OUT"/*.png
echo "Previews of the first image forming, step by step: $OUT/previews/"
