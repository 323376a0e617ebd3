#!/usr/bin/env bash
# make demo: start a server on the embedded model, generate through the CLI with previews,
# stop the server (SIGTERM, graceful drain), and say where the files are.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT="${PORT:-50071}"
METRICS_PORT="${METRICS_PORT:-9471}"
OUT="${OUT:-demo-output}"
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== starting stepserve on 127.0.0.1:$PORT (log: $OUT/server.log)"
"$BIN/stepserve" serve --host 127.0.0.1 --port "$PORT" --metrics-port "$METRICS_PORT" >"$OUT/server.log" 2>&1 &
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

echo "== editing an image: image-to-image, then inpainting (the embedded model's own render as input)"
"$BIN/python" - "$OUT" <<'PY'
import sys
from PIL import Image
from models.tiny import data
red = data.Sample("red", "circle", "large", "left")
data.render(red).save(f"{sys.argv[1]}/input-red-circle.png")
Image.fromarray(data.edit_mask(red)).save(f"{sys.argv[1]}/input-mask-left.png")
PY
"$BIN/stepserve-client" --target "127.0.0.1:$PORT" generate "a large blue circle on the left" \
  --init-image "$OUT/input-red-circle.png" --strength 0.7 --seed 1 -o "$OUT/img2img-blue-circle.png"
"$BIN/stepserve-client" --target "127.0.0.1:$PORT" generate "a large green square on the left" \
  --init-image "$OUT/input-red-circle.png" --mask "$OUT/input-mask-left.png" --strength 1 \
  --preserve-unmasked --seed 2 -o "$OUT/inpaint-green-square.png"

echo "== the same prompt with the model's own LoRA adapters, batched together in one forward"
STYLED=()
for STYLE in outline stripes; do
  "$BIN/stepserve-client" --target "127.0.0.1:$PORT" generate "a large red circle on the left" \
    --lora "$STYLE" --seed 4 -o "$OUT/lora-$STYLE.png" &
  STYLED+=($!)
done
"$BIN/stepserve-client" --target "127.0.0.1:$PORT" generate "a large red circle on the left" \
  --seed 4 -o "$OUT/lora-none.png"
wait "${STYLED[@]}"

echo "== what Prometheus would scrape (http://127.0.0.1:$METRICS_PORT/metrics), in part"
"$BIN/python" - "$METRICS_PORT" <<'PY'
import sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
want = {"stepserve_requests_total", "stepserve_images_total", "stepserve_cost_usd_total",
        "stepserve_admitted_requests_total", "stepserve_lora_requests_total",
        "stepserve_batch_size_sum", "stepserve_batch_size_count", "stepserve_queue_depth"}
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        if s.name in want and s.value:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            print(f"  {s.name}{{{labels}}} {s.value:g}")
PY

echo "== stopping the server"
kill -TERM $SERVER
wait $SERVER || true
trap - EXIT
echo
echo "Done. Images are in $OUT/:"
ls -1 "$OUT"/*.png
echo "Previews of the first image forming, step by step: $OUT/previews/"
