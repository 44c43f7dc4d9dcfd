#!/usr/bin/env bash
# A JetStream cluster of three nats-servers on this machine, for trying Agora at R3 (the
# production topology) without three machines: each server has its own store under DIR, the
# routes join them, and the URL list to give `agora node --nats-url` is printed. Runs until
# Ctrl-C (or SIGTERM), then stops the three servers.
#
#   bash scripts/nats-cluster.sh [DIR] [FIRST_CLIENT_PORT]
#
# DIR defaults to ./nats-cluster; client ports are FIRST_CLIENT_PORT (4222) and the next two,
# route ports 6222-6224. Nodes then run with `[streams] replicas = 3`
# (or AGORA_STREAMS__REPLICAS=3), e.g.:
#   AGORA_STREAMS__REPLICAS=3 agora node --nats-url nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224
# On real machines, use config/nats/cluster.conf as the model: one server per machine.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_nats_server

dir="${1:-nats-cluster}"
first="${2:-4222}"
mkdir -p "$dir"
routes=""
for i in 0 1 2; do
  routes="${routes:+$routes, }\"nats-route://127.0.0.1:$((6222 + i))\""
done
pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM
urls=""
for i in 0 1 2; do
  port=$((first + i))
  cat >"$dir/n$i.conf" <<EOF
server_name: "agora-nats-$i"
listen: "127.0.0.1:$port"
jetstream { store_dir: "$dir/n$i" }
cluster {
  name: "agora"
  listen: "127.0.0.1:$((6222 + i))"
  routes: [$routes]
}
EOF
  nats-server --config "$dir/n$i.conf" --log "$dir/n$i.log" &
  pids+=("$!")
  urls="${urls:+$urls,}nats://127.0.0.1:$port"
done
echo "three nats-servers clustered (logs and stores in $dir); Ctrl-C stops them"
echo "NATS URL list: $urls"
wait
