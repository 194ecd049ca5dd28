#!/usr/bin/env bash
# The project's test command: everything CI checks, runnable on a fresh machine with a Rust
# toolchain (no GPU needed). Cold, it takes 30-40 minutes on 2 cores, most of it compiling burn.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== format"
cargo fmt --all -- --check

echo "== unit, property, example and benchmark-harness tests (CPU backend)"
cargo test --workspace --all-targets

echo "== kv-model's golden, property and f16-weight tests on burn-flex, the fast CPU backend"
cargo test -p kv-model --features flex --tests

echo "== documentation examples"
cargo test --workspace --doc

echo "== the cuda backend compiles and lints clean (no GPU needed to build)"
cargo clippy --workspace --all-targets --features cuda -- -D warnings

echo "== the GPU tests build and, without an NVIDIA driver, say SKIPPED and pass"
cargo test -p kv-model --features cuda --test gpu -- --test-threads 1
