#!/usr/bin/env bash
# All the tests, as CI runs them: formatting, lints, every test (optimized build, so the oracle
# test runs its full million commands; the bus tests start real nats-servers), the fuzz target
# must build (the benches are compiled by clippy), and the committed sample must still replay to
# its recorded hash. The deployment files are validated (compose, Kubernetes schemas, alert rules
# with promtool) and the container image is built and traded through. Installs what is missing (nats-server, the
# rotel collector, PostgreSQL, MariaDB, promtool, docker-compose, kubernetes-validate, podman,
# Node.js, Chromium and playwright-core, the clippy and rustfmt components) and says what it cannot install.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step says how far into the run it starts (the suite's budget is 35 minutes on 2 cores).
step() { printf '\n==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

. scripts/lib.sh
need_cargo
if command -v rustup >/dev/null 2>&1; then
  for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
      step "installing the ${component} component"
      rustup component add "${component}"
    fi
  done
fi
need_nats_server
need_python_client
need_rotel
need_postgres
need_mariadb
need_promtool
need_compose
need_kubernetes_validate
need_container_engine
need_playwright
echo "nats-server: $(command -v nats-server) ($(nats-server --version))"

step "alert rules: promtool check rules, promtool test rules"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml

step "deployment files: deploy/compose.yaml (docker-compose config and consistency), deploy/k8s (Kubernetes schemas, keys, references)"
bash scripts/check-compose.sh
python3 scripts/check-k8s.py

step "the web page's book-keeping and candles: node --test web/test/"
node --test web/test/

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

# Optimized like release, without its link-time optimization (Cargo.toml, `[profile.suite]`).
step "cargo test --profile suite (unit, scenarios, oracle, samples, allocation, bus, market, node, cluster, history, the web page in Chromium)"
cargo test --profile suite

step "the container image: built (scripts/image.sh), started, traded through from this host"
# The binary the tests just ran: a plain build would compile it again with other features.
AGORA_IMAGE_BINARY=target/suite/agora bash scripts/image-test.sh

# The benches are compiled by clippy above (--all-targets: types, borrows, lints); a release
# link of all five took 4-5 minutes of the budget and checks nothing more. The fuzz target is
# its own workspace, so clippy does not see it: it is built and linked against libFuzzer.
step "the fuzz target builds"
cargo build --manifest-path fuzz/Cargo.toml --bins

step "all tests passed"
