#!/usr/bin/env bash
# The main job, from a fresh machine: the patent's flow on real Linux guests under QEMU.
#  1. builds three templates: a base Linux, the base with a web server initialised, and the
#     web template with a worker initialised as well (chain base <- web <- worker);
#  2. shows the chain and the stored sizes next to the full images and to three
#     zstd-compressed full images;
#  3. loads a new VM equivalent to the third template, runs commands in it, prints timings,
#     then snapshots it while it runs into a fourth template and loads a VM from that;
#  3c. starts a real object store (OpenStack Swift's S3 API, scripts/object-store.sh), pushes
#     worker to it, and runs worker on a second host (an empty store) that fetches only
#     what it lacks;
#  4. starts the service (deltavm serve) with a warm pool of 'worker', creates a VM from the
#     pool over the HTTP API, runs a command in it, shows an excerpt of the metrics, stops it;
#  5. runs the benchmarks: bench-delta (deltavm vs xdelta3 vs zstd --patch-from),
#     bench-restore (deltavm load vs QEMU flat-file restore vs QEMU stock restore) and
#     bench-serve (concurrent clients on the service, cold and pooled) and bench-remote
#     (runs across hosts against warm runs, bytes fetched, throughput against curl).
# DELTAVM_BENCH_RUNS (default 5), DELTAVM_BENCH_LOADS (default 10) and DELTAVM_BENCH_ROUNDS
# (default 5) set the repetitions.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/setup.sh"
"$repo/scripts/build.sh" >/dev/null
"$repo/scripts/guest-kit.sh" >/dev/null
cache=${DELTAVM_CACHE:-$repo/.cache}
store=$cache/demo-store
runtime=$cache/demo-runtime
rm -rf "$store" "$runtime"
deltavm=("$repo/build/deltavm" --store "$store" --runtime "$runtime")
scratch=$(mktemp -d "${TMPDIR:-/tmp}/deltavm-demo.XXXXXX")
serve_pid=
# Beside the scratch directory, not in it: the store's servers run as user swift, and the
# scratch directory is private to us.
object_store=$scratch-object-store
trap '[[ -z $serve_pid ]] || kill "$serve_pid" 2>/dev/null; wait 2>/dev/null;
      "${deltavm[@]}" stop --all >/dev/null 2>&1 || true;
      "${deltavm_b[@]}" stop --all >/dev/null 2>&1 || true;
      "$repo/scripts/object-store.sh" stop "$object_store" >/dev/null 2>&1 || true; rm -rf "$scratch"' EXIT
deltavm_b=("$repo/build/deltavm" --store "$scratch/host-b-store" --runtime "$scratch/host-b-runtime")

echo "== 1. building templates (each boots Linux under QEMU, runs its setup, is captured and stored)"
for name in base web worker; do
  "${deltavm[@]}" template build "$repo/examples/$name.json"
done

echo
echo "== 2. the chain and what it costs on disk"
"${deltavm[@]}" template ls
zstd_total=0
for name in base web worker; do
  "${deltavm[@]}" store get "$name" -o "$scratch/$name.ram" >/dev/null
  zstd -q -3 -T1 "$scratch/$name.ram" -o "$scratch/$name.ram.zst"
  zstd_total=$((zstd_total + $(stat -c %s "$scratch/$name.ram.zst")))
  rm -f "$scratch/$name.ram"
done
stored=$("${deltavm[@]}" --json store ls | grep -o '"stored_size_bytes": [0-9]*' | awk '{s+=$2} END {print s}')
awk -v s="$stored" -v z="$zstd_total" 'BEGIN {
  printf "three templates stored as images:       %8.1f MB\n", s / 1e6;
  printf "three full images, each zstd -3:        %8.1f MB\n", z / 1e6;
  printf "ratio (stored / zstd full images):      %8.3f\n", s / z }'

echo
echo "== 3. request: a new VM equivalent to 'worker' (base + delta web + delta worker)"
"${deltavm[@]}" --json run worker > "$scratch/run.json"
id=$(grep -o '"id": "[0-9a-f]*"' "$scratch/run.json" | cut -d'"' -f4)
start=$(date +%s%N)
"${deltavm[@]}" exec "$id" -- cat /run/worker.ticks >/dev/null
answered=$(( ($(date +%s%N) - start) / 1000000 ))
echo "VM $id is running:"
"${deltavm[@]}" ps
echo "\$ deltavm exec $id -- 'cat /etc/motd; wc -l /var/lib/worker/jobs; wget -q -O - http://127.0.0.1:8080/; cat /run/worker.ticks; uname -r'"
"${deltavm[@]}" exec "$id" -- 'cat /etc/motd; wc -l /var/lib/worker/jobs; wget -q -O - http://127.0.0.1:8080/; cat /run/worker.ticks; uname -r'
awk -v a="$answered" '
  /"prepare_ms"/ {gsub(/[,]/, ""); prepare = $2}
  /"launch_ms"/ {gsub(/[,]/, ""); launch = $2}
  /"fill_ms"/ {gsub(/[,]/, ""); fill = $2}
  /"state_ms"/ {gsub(/[,]/, ""); state = $2}
  /"total_ms"/ {gsub(/[,]/, ""); total = $2}
  END {
    printf "\n%-52s %8s\n", "load phase", "ms";
    printf "%-52s %8.1f\n", "prepare (chain read from the catalog, base mapped)", prepare;
    printf "%-52s %8.1f\n", "launch (QEMU to control socket ready)", launch;
    printf "%-52s %8.1f\n", "  fill (deltas verified, applied, written; overlaps)", fill;
    printf "%-52s %8.1f\n", "machine state loaded, vCPUs started", state;
    printf "%-52s %8.1f\n", "request -> VM running", total;
    printf "%-52s %8.1f\n", "first command answered (deltavm exec)", a }' "$scratch/run.json"

echo
echo "== 3b. snapshot: what the running VM changed since its load, stored as a new template"
echo "\$ deltavm exec $id -- sh -c 'echo written-after-the-load > /tmp/live; sleep 1000 &'"
"${deltavm[@]}" exec "$id" -- sh -c 'echo written-after-the-load > /tmp/live; sleep 1000 >/dev/null 2>&1 &'
echo "\$ deltavm snapshot $id worker-live"
"${deltavm[@]}" snapshot "$id" worker-live
clone=$("${deltavm[@]}" run worker-live)
echo "\$ deltavm exec $clone -- sh -c 'cat /tmp/live; ps | grep -c \"[s]leep 1000\"'    # loaded from the snapshot"
"${deltavm[@]}" exec "$clone" -- sh -c 'cat /tmp/live; ps | grep -c "[s]leep 1000"'
"${deltavm[@]}" template ls
"${deltavm[@]}" stop "$clone" "$id"

echo
echo "== 3c. another host: worker through a real object store (Swift's S3 API on 127.0.0.1)"
"$repo/scripts/object-store.sh" start "$object_store"
# shellcheck disable=SC1090
source <("$repo/scripts/object-store.sh" env "$object_store")
bucket_url="s3://$DELTAVM_S3_BUCKET_HINT/demo"
echo "\$ deltavm remote add origin $bucket_url --endpoint $DELTAVM_S3_ENDPOINT; deltavm push worker"
"${deltavm[@]}" remote add origin "$bucket_url" --endpoint "$DELTAVM_S3_ENDPOINT"
"${deltavm[@]}" push worker
echo "\$ deltavm run worker    # on host B: an empty store with the same remote"
"${deltavm_b[@]}" remote add origin "$bucket_url" --endpoint "$DELTAVM_S3_ENDPOINT" >/dev/null
start=$(date +%s%N)
remote_id=$("${deltavm_b[@]}" run worker)
"${deltavm_b[@]}" exec "$remote_id" -- cat /run/worker.ticks >/dev/null
echo "host B: request -> first answer, fetch included: $(( ($(date +%s%N) - start) / 1000000 )) ms"
"${deltavm_b[@]}" exec "$remote_id" -- 'cat /etc/motd; wget -q -O - http://127.0.0.1:8080/'
"${deltavm_b[@]}" stop "$remote_id"

echo
echo "== 4. the service: deltavm serve with a warm pool of 2 'worker' VMs"
echo '{"pools": {"worker": 2}, "max_vms": 16}' > "$scratch/serve.json"
# In a session of its own, as systemd would start it: its CPU priority is then its own to set.
setsid "${deltavm[@]}" serve --config "$scratch/serve.json" 2> "$scratch/serve.err" &
serve_pid=$!
socket=$runtime/service.sock
api() { curl -sS --fail-with-body --unix-socket "$socket" "$@"; }
for _ in $(seq 600); do
  [[ -S $socket ]] && api http://localhost/v1/templates/worker 2>/dev/null | grep -q '"ready":2' && break
  sleep 0.1
done
echo "\$ curl --unix-socket $socket http://localhost/v1/templates/worker"
api http://localhost/v1/templates/worker | grep -o '"pool":{[^}]*}'
echo "\$ curl --unix-socket $socket -d '{\"template\": \"worker\", \"ttl_seconds\": 300}' http://localhost/v1/vms"
api -d '{"template": "worker", "ttl_seconds": 300}' http://localhost/v1/vms > "$scratch/vm.json"
cat "$scratch/vm.json"; echo
id=$(grep -o '"id":"[0-9a-f]*"' "$scratch/vm.json" | cut -d'"' -f4)
echo "\$ curl --unix-socket $socket -d '{\"command\": [\"sh\", \"-c\", \"cat /etc/motd; uname -r\"]}' http://localhost/v1/vms/$id/exec"
api -d '{"command": ["sh", "-c", "cat /etc/motd; uname -r"]}' "http://localhost/v1/vms/$id/exec"; echo
echo "\$ deltavm exec $id -- cat /run/worker.ticks     # the command line goes through the service"
"${deltavm[@]}" exec "$id" -- cat /run/worker.ticks
api -X DELETE "http://localhost/v1/vms/$id"
echo "\$ curl --unix-socket $socket http://localhost/metrics   (excerpt)"
api http://localhost/metrics | grep -E '^(deltavm_loads_total|deltavm_load_seconds_(sum|count)|deltavm_pool_vms|deltavm_vms\{|process_resident)'
kill -TERM "$serve_pid"
wait "$serve_pid"
serve_pid=
cat "$scratch/serve.err"

echo
echo "== 5. benchmarks"
images=$cache/images
"$repo/scripts/make-guest-images.sh" "$images"
"$repo/build/bench-delta" --base "$images/guest-0.ram" --target "$images/guest-1.ram" \
  --third "$images/guest-2.ram" --runs "${DELTAVM_BENCH_RUNS:-5}"
echo
"$repo/build/bench-restore" --store "$store" --template worker --loads "${DELTAVM_BENCH_LOADS:-10}" \
  --runtime "$scratch/bench-runtime"
echo
"$repo/build/bench-serve" --store "$store" --template worker --rounds "${DELTAVM_BENCH_ROUNDS:-5}" \
  --runtime "$scratch/bench-serve"
echo
"$repo/build/bench-remote" --store "$store" --template worker --rounds "${DELTAVM_BENCH_ROUNDS:-5}" \
  --runtime "$scratch/bench-remote"
