#!/usr/bin/env bash
# Fuzzes each target of fuzz/ for a bounded time; fails if any finds an input
# that crashes it (a panic, an arithmetic overflow), runs too long or takes
# too much memory, and says how to reproduce it. docs/fuzzing.md tells more.
#
#   bash .ci/fuzz.sh                       # every target, 60 s each (CI)
#   FUZZ_SECONDS=1800 bash .ci/fuzz.sh imap_command smtp_command
#
# What the fuzzer learns goes to fuzz/work/TARGET (not committed); the seeds
# in fuzz/corpus/TARGET are only read.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
seconds="${FUZZ_SECONDS:-60}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi

# libFuzzer's instrumentation needs unstable compiler flags: the nightly
# toolchain where one is installed, else the default one with the flags let
# through.
if rustup run nightly rustc --version >/dev/null 2>&1; then
  cargo=(cargo +nightly)
  how="cargo +nightly"
else
  export RUSTC_BOOTSTRAP=1
  cargo=(cargo)
  how="RUSTC_BOOTSTRAP=1 cargo"
fi
# Safe Rust: what is worth finding is a panic or an overflow, not a memory
# error, so no sanitizer (several times the executions) and overflow checks on.
flags=(--sanitizer none --debug-assertions)

# The fuzz crate builds the proxy with the workspace's locked versions.
cp Cargo.lock fuzz/Cargo.lock

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <("${cargo[@]}" fuzz list)
fi

started=$SECONDS
"${cargo[@]}" fuzz build "${flags[@]}"
echo "fuzz: built the targets in $((SECONDS - started)) s"

found=()
for target in "${targets[@]}"; do
  dict="$root/fuzz/imap_smtp.dict"
  [ "$target" = config ] && dict="$root/fuzz/config.dict"
  work="$root/fuzz/work/$target"
  mkdir -p "$work" "$root/fuzz/artifacts/$target"
  touch "$work/.started"
  echo "fuzz: $target for ${seconds} s"
  if ! "${cargo[@]}" fuzz run "${flags[@]}" "$target" "$work" "$root/fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
    -dict="$dict" -print_final_stats=1; then
    found+=("$target")
  fi
done

if [ "${#found[@]}" -gt 0 ]; then
  echo
  for target in "${found[@]}"; do
    echo "fuzz: $target failed: it crashed, ran over 10 s or over 2 GiB on the input(s) below (or did not run)."
    find "$root/fuzz/artifacts/$target" -type f -newer "$root/fuzz/work/$target/.started" |
      while read -r artifact; do
        echo "  reproduce: $how fuzz run ${flags[*]} $target ${artifact#"$root/"}"
      done
  done
  echo "Fix the bug with a regression test; docs/fuzzing.md says how."
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${seconds} s each, no crash ($((SECONDS - started)) s in all)"
