#!/usr/bin/env bash
# The main job: an Agora node with its own nats-server (JetStream data under ./data/nats) and the
# seed markets BTC-USDC, ETH-USDC and SOL-USDC, in the foreground; Ctrl-C stops it cleanly.
# Arguments go to `agora node` (e.g. --nats-url nats://host:4222 to use a running NATS). The web
# page is on http://127.0.0.1:9464/ (AGORA_HTTP_PORT or --http-port for another port).
# Offline instead: target/release/agora replay samples/sample.jsonl --market samples/sample-market.toml
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_cargo
need_nats_server
need_python_client
cargo build --release --quiet
# The web page, /metrics, /health and /ready on port 9464 of this machine only, unless said
# otherwise (AGORA_HTTP_ADDR=0.0.0.0 opens them to the network).
export AGORA_HTTP_PORT="${AGORA_HTTP_PORT:-9464}"
export AGORA_HTTP_ADDR="${AGORA_HTTP_ADDR:-127.0.0.1}"
echo "==> starting the node; open http://127.0.0.1:${AGORA_HTTP_PORT}/ to watch the markets, and"
echo "    from another terminal, place orders and see the fills with:"
echo "    python3 examples/python/place_order.py <the NATS URL printed below>"
echo "    or: AGORA_NATS_URL=<that URL> target/release/agora order place --market BTC-USDC --account alice --side sell --price 65000.00 --qty 0.5"
echo "        AGORA_NATS_URL=<that URL> target/release/agora watch trades --market BTC-USDC"
exec target/release/agora node "$@"
