#!/usr/bin/env bash
# The main job: build agora and replay the committed sample order flow through one book,
# offline. Events go to target/replay/events.jsonl; the final book and a summary are shown.
# Any arguments replace the defaults, e.g.:  bash scripts/run.sh my-commands.jsonl --book 10
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust 1.89 or newer (https://rustup.rs), then run this again." >&2
  exit 1
fi

cargo build --release --quiet
mkdir -p target/replay
if [ "$#" -gt 0 ]; then
  exec target/release/agora replay "$@"
fi

events=target/replay/events.jsonl
target/release/agora replay samples/sample.jsonl --market samples/sample-market.toml --book 5 --out "$events"
echo
echo "first events (all $(wc -l < "$events") lines are in $events):"
head -n 4 "$events"
echo
echo "final book (top 5 levels):"
tail -n 1 "$events"
echo
echo "the book alone, timed over 5 repetitions:"
target/release/agora replay samples/sample.jsonl --market samples/sample-market.toml --bench 5
