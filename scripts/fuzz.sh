#!/usr/bin/env bash
# Runs the fuzz targets (see fuzz/README.md): builds them with cargo-fuzz on
# stable Rust, then runs each for SECONDS on its committed corpus.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]    default: 60 s each, every target
#
# New inputs go to fuzz/target/corpus/TARGET (the committed corpus is only
# read); a crash stops the script, its input in fuzz/artifacts/TARGET.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config provider socket authorize reply instants)

# About 45 s to install, once.
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2

# cargo-fuzz passes -Z flags (sanitizer, coverage instrumentation); stable
# rustc takes them with RUSTC_BOOTSTRAP=1, so no nightly toolchain is needed.
export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do
  dict=()
  [ -f "dict/$t.dict" ] && dict=("-dict=dict/$t.dict")
  mkdir -p "target/corpus/$t" "corpus/$t"
  # -a: debug assertions and overflow checks, as in the test builds.
  cargo fuzz run -a "$t" "target/corpus/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=30 -max_len=8192 -print_final_stats=1 "${dict[@]}"
done
