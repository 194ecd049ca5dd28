#!/usr/bin/env bash
# A GPU backend, checked and timed in one short run: cuda on a machine with an NVIDIA GPU, or
# wgpu on any Vulkan, Metal or DX12 device (Mesa's lavapipe included, a Vulkan device on the
# CPU, which is how this script is proven on machines without a GPU):
#
#   1. build kv-bench (release) and kv-model's GPU tests with `--features BACKEND`;
#   2. equivalence: kv-model/tests/gpu.rs on the device (the tiny transformers fixtures: logits
#      within 1e-3, greedy tokens identical with no cache and every cache kind; CPU and GPU
#      agreeing on every cache kind, quantized ones included);
#   3. a model with SmolLM2-135M-Instruct's shape (kv-bench/configs) and random weights, written
#      once by transformers, so both systems run the very same weights (the real weights stay
#      behind: this check must run on a machine without network);
#   4. `kv-bench compare --backend BACKEND` for NEW_TOKENS new tokens, with transformers
#      interleaved in the same loop (on the same GPU for cuda; on the CPU for wgpu, since
#      PyTorch has no Vulkan device), and its table printed last.
#
# Usage (BACKEND: cuda, the default, or wgpu):
#   scripts/gpu-check.sh [BACKEND]                  # needs cargo, python3 with torch + transformers
#   scripts/gpu-check.sh --build-only DIR [BACKEND] # step 1 only: binaries stripped into DIR, and
#                                                   # DIR/gpu-check-bins.tar.xz (13 MB) to carry
#   scripts/gpu-check.sh --prebuilt DIR [BACKEND]   # steps 2-4 with binaries from --build-only
#                                                   # (unpacked from the tarball if need be)
#   scripts/gpu-check.sh --dry-run                  # no GPU: CPU backend (flex), 24 tokens, to
#                                                   # check the script itself
# Environment: PYTHON (python3), NEW_TOKENS (1000), RUNS (2), CACHES ("dynamic static"),
# UNCACHED=1 to add the run without a cache, OUT (where results go; default bench-out/BACKEND).
# On lavapipe a step takes far longer than on a GPU: NEW_TOKENS=32 RUNS=1 CACHES=dynamic is
# what proves the procedure there in a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
bin_dir=""
case "${1:-}" in
  --build-only) mode=build; bin_dir="${2:?--build-only needs a directory}"; shift 2 ;;
  --prebuilt) bin_dir="${2:?--prebuilt needs a directory}"; shift 2 ;;
  --dry-run) mode=dry; shift ;;
esac
backend="${1:-cuda}"
case "$backend" in
  cuda | wgpu) ;;
  *) echo "gpu-check: unknown argument $backend (--build-only DIR, --prebuilt DIR, --dry-run; backend cuda or wgpu)" >&2; exit 2 ;;
esac

python="${PYTHON:-python3}"
out="${OUT:-bench-out/$backend}"
new_tokens="${NEW_TOKENS:-1000}"
runs="${RUNS:-2}"
read -r -a caches <<<"${CACHES:-dynamic static}"
features=(--features "$backend")
test_features=(--features "$backend")
peer_device=cuda
# cuda's tests in release, as a GPU machine runs them once; wgpu's in the test profile CI
# builds anyway (dependencies optimised there too), so no second build of burn-wgpu.
test_profile=(--release)
if [[ $backend == wgpu ]]; then
  peer_device=cpu
  test_profile=()
fi
if [[ $mode == dry ]]; then
  # The CPU build CI already makes; the GPU tests in the test profile, where they skip.
  backend=flex
  features=()
  test_features=(--features cuda)
  test_profile=()
  peer_device=cpu
  new_tokens="${NEW_TOKENS:-24}"
  runs="${RUNS:-1}"
fi
mkdir -p "$out"
started=$SECONDS
step() { echo "== [$((SECONDS - started)) s] $*"; }

# 1. Build: kv-bench, and the test binary of kv-model/tests/gpu.rs (found through cargo's JSON).
if [[ -z $bin_dir || $mode == build ]]; then
  step "build kv-bench ${features[*]} (release) and the GPU tests ${test_features[*]}"
  cargo build --release -p kv-bench "${features[@]}"
  test_bin=$(cargo test "${test_profile[@]}" -p kv-model "${test_features[@]}" --test gpu --no-run \
      --message-format=json 2>/dev/null |
    "$python" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')
  bench_bin=target/release/kv-bench
  if [[ $mode == build ]]; then
    mkdir -p "$bin_dir"
    cp "$bench_bin" "$bin_dir/kv-bench"
    cp "$test_bin" "$bin_dir/kv-model-gpu-tests"
    strip "$bin_dir/kv-bench" "$bin_dir/kv-model-gpu-tests"
    # Stripped, the two are about 88 MB; compressed, about 13 MB, which is what to carry.
    tar -cJf "$bin_dir/gpu-check-bins.tar.xz" -C "$bin_dir" kv-bench kv-model-gpu-tests
    ls -l "$bin_dir"
    exit 0
  fi
else
  if [[ ! -x $bin_dir/kv-bench && -f $bin_dir/gpu-check-bins.tar.xz ]]; then
    tar -xJf "$bin_dir/gpu-check-bins.tar.xz" -C "$bin_dir"
  fi
  bench_bin="$bin_dir/kv-bench"
  test_bin="$bin_dir/kv-model-gpu-tests"
fi

# The device, as its driver names it.
if [[ $backend == cuda ]] && command -v nvidia-smi >/dev/null; then
  card=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
elif [[ $backend == wgpu ]]; then
  icds=$(ls /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>/dev/null | grep json | sed 's/_icd.*//' | sort -u | xargs || true)
  card="wgpu's default adapter (Vulkan drivers installed: ${icds:-none}; lvp is lavapipe, on the CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
else
  card="no NVIDIA GPU (dry run on the CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
fi
step "device: $card"

# 2. Equivalence on the GPU. Without a driver these tests say SKIPPED and pass.
step "equivalence tests (kv-model/tests/gpu.rs)"
equivalence=passed
if ! CARGO_MANIFEST_DIR="$PWD/kv-model" "$test_bin" --test-threads 1 2>&1 | tee "$out/gpu-tests.log"; then
  equivalence=FAILED
fi
grep -q SKIPPED "$out/gpu-tests.log" && equivalence="skipped (no device: see $out/gpu-tests.log)"
[[ $equivalence == FAILED ]] && { step "equivalence FAILED: see $out/gpu-tests.log"; exit 1; }

# 3. The same random weights for both systems.
model_dir="${TMPDIR:-/tmp}/kv-cache-smollm2-random"
if [[ ! -f $model_dir/model.safetensors ]]; then
  step "random weights with SmolLM2-135M-Instruct's shape"
  "$python" kv-bench/peers/random_model.py kv-bench/configs/smollm2-135m-instruct.json "$model_dir"
fi

# 4. Timing: ours and transformers, interleaved, same prompt ids, EOS ignored.
uncached=(--no-uncached)
[[ ${UNCACHED:-0} == 1 ]] && uncached=()
step "kv-bench compare: $new_tokens new tokens, $runs runs, backend $backend, peer on $peer_device"
"$bench_bin" compare --model "$model_dir" --backend "$backend" \
  --prompt-ids 1,504,3250,314,24967,6703,47,2 --new-tokens "$new_tokens" \
  --runs "$runs" --warmup 1 --cache "${caches[@]}" "${uncached[@]}" \
  --peer hf --peer-python "$python" --peer-device "$peer_device" --out "$out" \
  2> >(grep -v '^kv-bench: run ' >&2) | tee "$out/table.txt"

step "done"
echo
echo "device:      $card"
echo "backend:     $backend (transformers on $peer_device)"
echo "weights:     random, SmolLM2-135M-Instruct's shape (134.5M parameters, f32)"
echo "equivalence: $equivalence"
cat "$out/table.txt"
