#!/usr/bin/env bash
# The container image, tested as a user runs it: builds it (scripts/image.sh), starts it the way
# the Dockerfile's header says (a node with its own nats-server, ports published on loopback, data
# in a named volume), and from this host, through the published port, trades with the Python SDK:
# a sell rests, a buy crosses it, the fill and the rest are reported. Checks the container runs
# as uid 10001, serves the web page, its healthcheck says healthy, `stop` ends it cleanly (exit 0), and a new container
# on the same volume still holds the resting order. Removes its container and volume at the end.
#
#   bash scripts/image-test.sh [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_container_engine
need_python_client
engine="$AGORA_CONTAINER_ENGINE"
image=agora:latest

[ "${1:-}" = --no-build ] || bash scripts/image.sh --local

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
nats_port="$(free_port)"
http_port="$(free_port)"
name="agora-image-test-$$"
volume="agora-image-test-$$"
cleanup() {
  "$engine" rm -f "$name" >/dev/null 2>&1 || true
  "$engine" volume rm -f "$volume" >/dev/null 2>&1 || true
}
trap cleanup EXIT
fail() {
  echo "image test FAILED: $*" >&2
  echo "--- container log:" >&2
  "$engine" logs "$name" >&2 2>/dev/null || true
  exit 1
}

start() {
  "$engine" run -d --name "$name" "${CONTAINER_RUNTIME_FLAGS[@]}" "${CONTAINER_RUN_FLAGS[@]}" \
    -p "127.0.0.1:$nats_port:4222" -p "127.0.0.1:$http_port:9464" \
    -v "$volume:/var/lib/agora" "$image" >/dev/null
  local i
  for i in $(seq 1 120); do
    if python3 - "$http_port" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
    "$engine" ps --format '{{.Names}}' | grep -qx "$name" || fail "the container exited before it was ready"
    sleep 0.5
  done
  fail "not ready on /ready within 60 s"
}

stop() {
  "$engine" stop -t 30 "$name" >/dev/null
  local code
  code="$("$engine" inspect --format '{{.State.ExitCode}}' "$name")"
  [ "$code" = 0 ] || fail "the node exited with $code on stop (SIGTERM), not 0"
  "$engine" rm "$name" >/dev/null
}

echo "==> image test: starting $image (NATS on 127.0.0.1:$nats_port, HTTP on 127.0.0.1:$http_port)"
start
uid="$("$engine" exec "$name" id -u)"
[ "$uid" = 10001 ] || fail "the container runs as uid $uid, not 10001 (agora)"
if [ "$engine" = podman ]; then
  "$engine" healthcheck run "$name" 2>/dev/null || fail "the healthcheck says unhealthy"
else
  for i in $(seq 1 30); do
    [ "$("$engine" inspect --format '{{.State.Health.Status}}' "$name")" = healthy ] && break
    [ "$i" = 30 ] && fail "the healthcheck never said healthy"
    sleep 1
  done
fi
"$engine" exec "$name" agora --version | grep -q '^agora ' || fail "agora --version inside the image"
python3 - "$http_port" <<'PY' || fail "the web page on the published HTTP port"
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=5) as r:
    assert r.status == 200 and b"/assets/app.js" in r.read()
PY

echo "==> trading from the host through the published NATS port"
python3 - "nats://127.0.0.1:$nats_port" <<'PY' || fail "trading through the container"
import asyncio, sys
from decimal import Decimal as D
import agora_client

async def main(url):
    alice = await agora_client.connect(url, account="alice")
    bob = await agora_client.connect(url, account="bob")
    sell = await alice.place("BTC-USDC", "sell", "0.5", "65000.00", cid="image-sell", wait=10)
    assert sell[0].type == "accepted", sell
    reports = await bob.place("BTC-USDC", "buy", "0.2", "65000.00", cid="image-buy", wait=10)
    fills = [r for r in reports if r.type == "fill"]
    assert fills and fills[-1].get("qty") == D("0.2") and fills[-1].get("price") == D("65000"), reports
    mine = await alice.order_status("BTC-USDC", cid="image-sell")
    assert (mine.leaves, mine.filled) == (D("0.3"), D("0.2")), mine
    print(f"bob bought 0.2 at 65000.00 from alice; alice has {mine.leaves} open")
    await alice.close(); await bob.close()

asyncio.run(main(sys.argv[1]))
PY

echo "==> stopping (SIGTERM) and starting a new container on the same volume"
stop
start
python3 - "nats://127.0.0.1:$nats_port" <<'PY' || fail "the resting order after a restart on the same volume"
import asyncio, sys
from decimal import Decimal as D
import agora_client

async def main(url):
    alice = await agora_client.connect(url, account="alice")
    mine = await alice.order_status("BTC-USDC", cid="image-sell")
    assert (mine.leaves, mine.filled) == (D("0.3"), D("0.2")), mine
    await alice.cancel("BTC-USDC", cid="image-sell", wait=10)
    print(f"after the restart alice still had {mine.leaves} open; cancelled")
    await alice.close()

asyncio.run(main(sys.argv[1]))
PY
stop
echo "==> image test passed"
