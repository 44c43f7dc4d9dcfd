#!/usr/bin/env bash
# The book on families of flows that vary one thing at a time from workload (b) (100,000
# resting over 20,000 ticks, 2,000 accounts, 35% cancels, 80% of them young, half by cid):
# orders a level (through the price range), accounts, resting orders, cancel share, cancel age,
# and the held-out shape (one account, numeric cids, every cancel by cid). Each row is the
# median of ROUNDS runs of `agora replay --bench 3 --baseline` (the reference book timed on the
# same commands in the same run). Prints the table of BENCHMARKS.md, "Flow families".
# Usage: bash scripts/bench-families.sh [ROUNDS] [COMMANDS]
# AGORA_BIN=path times that binary instead of building this checkout (to compare two builds).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
commands=${2:-1000000}
if [ -z "${AGORA_BIN:-}" ]; then
  cargo build --release --quiet
fi
agora=${AGORA_BIN:-target/release/agora}
dir=target/bench/families
mkdir -p "$dir"

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# family | value | generate flags (on top of the base)
rows=(
  "base (b)|-|"
  "price range, ticks|100|--spread-ticks 100"
  "price range, ticks|1,000|--spread-ticks 1000"
  "price range, ticks|5,000|--spread-ticks 5000"
  "price range, ticks|100,000|--spread-ticks 100000"
  "price range, ticks|1,000,000|--spread-ticks 1000000"
  "accounts|1|--accounts 1"
  "accounts|10|--accounts 10"
  "accounts|100|--accounts 100"
  "accounts|10,000|--accounts 10000"
  "resting orders|1,000|--resting 1000 --spread-ticks 200"
  "resting orders|10,000|--resting 10000 --spread-ticks 2000"
  "resting orders|1,000,000|--resting 1000000 --spread-ticks 200000"
  "cancel share|10%|--cancel-pct 10"
  "cancel share|20%|--cancel-pct 20"
  "cancel share|50%|--cancel-pct 50"
  "cancel share|60%|--cancel-pct 60"
  "cancel age (young share)|0% (uniform)|--young-cancel-pct 0"
  "cancel age (young share)|50%|--young-cancel-pct 50"
  "cancel age (young share)|100%|--young-cancel-pct 100"
  "cancels by cid|100%, numeric cids|--cancel-by-cid-pct 100 --numeric-cids"
  "held-out shape|1 account, numeric cids, 31% cancels all by cid, 2,500 ticks|--accounts 1 --numeric-cids --cancel-by-cid-pct 100 --cancel-pct 31 --spread-ticks 2500"
)

printf '| family | value | resting | a level | cancels | fast, commands/s | reference, commands/s | ratio | p99 ns |\n'
printf '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n'
i=0
for row in "${rows[@]}"; do
  IFS='|' read -r family value flags <<<"$row"
  i=$((i + 1))
  file="$dir/$i-$commands.jsonl"
  profile="$dir/$i-$commands.profile"
  # shellcheck disable=SC2086 # the flags are words
  if [ ! -f "$file" ] || [ ! -f "$profile" ]; then
    "$agora" generate --seed 42 --commands "$commands" --resting 100000 --spread-ticks 20000 \
      --accounts 2000 $flags --profile --out "$file" 2>"$profile"
  fi
  # "resting N orders on L levels (X a level); flow C commands: ...% cancel (...)"
  read -r resting per_level cancels < <(awk '{gsub(/[(%]/," "); for (k=1;k<=NF;k++) {
      if ($k=="resting") r=$(k+1); if ($k=="a" && $(k+1)=="level);") l=$(k-1);
      if ($k=="cancel") c=$(k-1) } } END {print r, l, c}' "$profile")
  out=$(mktemp)
  for _ in $(seq "$rounds"); do
    "$agora" replay "$file" --symbol BENCH-USD --bench 3 --baseline >>"$out"
  done
  pick() { grep "^$1: " "$out" | awk '{print $2}' | median; }
  printf '| %s | %s | %s | %s | %s%% | %.2fM | %.2fM | %.2f | %s |\n' "$family" "$value" \
    "$resting" "$per_level" "$cancels" \
    "$(echo "$(pick commands_per_sec_median) / 1000000" | bc -l)" \
    "$(echo "$(pick baseline_commands_per_sec_median) / 1000000" | bc -l)" \
    "$(pick speedup_vs_baseline)" "$(pick latency_ns_p99)"
  rm -f "$out"
done
