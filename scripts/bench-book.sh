#!/usr/bin/env bash
# The book benchmarks of BENCHMARKS.md: generates the seeded workloads (once) into target/bench
# and times the fast book against the reference book on each, ROUNDS times, printing the median
# of each round's median. Usage: bash scripts/bench-book.sh [ROUNDS] [COMMANDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
commands=${2:-2000000}
cargo build --release --quiet
agora=target/release/agora
mkdir -p target/bench

gen() { # name resting spread accounts young
  local file="target/bench/$1-$commands.jsonl"
  [ -f "$file" ] || "$agora" generate --seed 42 --resting "$2" --spread-ticks "$3" --accounts "$4" \
    --young-cancel-pct "$5" --commands "$commands" --out "$file"
  echo "$file"
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

printf '| workload | fast, commands/s | reference, commands/s | ratio | p50 ns | p99 ns | p99.9 ns | p99.99 ns |\n'
printf '| --- | --- | --- | --- | --- | --- | --- | --- |\n'
for spec in "a:1000:400:200:80" "a-uniform:1000:400:200:0" "b:100000:20000:2000:80" "b-uniform:100000:20000:2000:0"; do
  IFS=: read -r name resting spread accounts young <<<"$spec"
  file=$(gen "$name" "$resting" "$spread" "$accounts" "$young")
  out=$(mktemp)
  for _ in $(seq "$rounds"); do
    "$agora" replay "$file" --symbol BENCH-USD --bench 5 --baseline >>"$out"
  done
  pick() { grep "^$1: " "$out" | awk '{print $2}' | median; }
  printf '| %s | %.2fM | %.2fM | %.2f | %s | %s | %s | %s |\n' "$name" \
    "$(echo "$(pick commands_per_sec_median) / 1000000" | bc -l)" \
    "$(echo "$(pick baseline_commands_per_sec_median) / 1000000" | bc -l)" \
    "$(pick speedup_vs_baseline)" "$(pick latency_ns_p50)" "$(pick latency_ns_p99)" \
    "$(pick latency_ns_p99.9)" "$(pick latency_ns_p99.99)"
  rm -f "$out"
done
