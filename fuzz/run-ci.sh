#!/usr/bin/env bash
# Bounded fuzz run for CI: builds the cargo-fuzz targets with nightly and runs each for
# FUZZ_SECONDS (default 25) from its committed seed corpus (fuzz/corpus/<target>/,
# read-only: new inputs go to a scratch corpus, so the repository is never written).
# Any crash, leak or timeout fails the run; libFuzzer's output, with the path of the
# artifact (fuzz/artifacts/<target>/crash-...), stays in the log.
#
#   fuzz/run-ci.sh                 # parse, pipeline, descriptors (FUZZ_CONFIG=1: and config)
#   fuzz/run-ci.sh parse pipeline  # some targets
#   FUZZ_SECONDS=600 fuzz/run-ci.sh pipeline   # a longer campaign
#
# Reproduce a finding (from fuzz/): cargo +nightly fuzz run -O -a -s none <target> artifacts/<target>/<file>
# (add --features=config for the config target).
set -euo pipefail
cd "$(dirname "$0")"

secs=${FUZZ_SECONDS:-25}
# No sanitizer by default: every crate fuzzed here is safe Rust except what the targets
# do not reach (nic-sim's memory module), libFuzzer still catches panics, overflows (-a:
# debug assertions and overflow checks on), stack overflows, timeouts and OOM, and the build is
# about twice as fast. FUZZ_SANITIZER=address for a longer campaign.
san=${FUZZ_SANITIZER:-none}
targets=("$@")
# `config` builds the agent (tonic, tokio, ...) instrumented: about 9 minutes on the
# 2-core CI machine, over the fuzz step's budget, so CI runs it only with
# FUZZ_CONFIG=1 (or when named on the command line).
if [ ${#targets[@]} -eq 0 ]; then
  targets=(parse pipeline descriptors)
  [ "${FUZZ_CONFIG:-0}" != 1 ] || targets+=(config)
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

features() { [ "$1" = config ] && echo "--features=config" || true; }

start=$(date +%s)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
summary=()
for t in "${targets[@]}"; do
  echo "fuzz: building $t"
  # shellcheck disable=SC2046
  cargo +nightly fuzz build -O -a -s "$san" $(features "$t") "$t"
  mkdir -p "$scratch/$t"
  log="$scratch/$t.log"
  echo "fuzz: running $t for ${secs}s"
  set +e
  # shellcheck disable=SC2046
  cargo +nightly fuzz run -O -a -s "$san" $(features "$t") "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
    -print_final_stats=1 2>&1 | tee "$log" | grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|==|SUMMARY|artifact_prefix|Test unit written|stat::)' 
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "fuzz: $t FAILED (exit $rc); last lines of its log:"
    tail -n 60 "$log"
    ls -l "artifacts/$t" 2>/dev/null || true
    exit 1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
  summary+=("$(printf '%-12s %10s execs %8s/s  cov %6s  %4s new inputs' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$(ls "$scratch/$t" | wc -l)")")
done
echo "fuzz: summary (${secs}s per target, $(( $(date +%s) - start ))s in all, builds included)"
printf '  %s\n' "${summary[@]}"
