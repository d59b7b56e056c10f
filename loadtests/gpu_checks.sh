#!/usr/bin/env bash
# The GPU benchmarks of BENCHMARKS.md, in parts that each fit one 10-minute device call.
# Run from the repo root on a CUDA machine with MLX's CUDA build importable; results go to $OUT
# (default loadtests/out/gpu). The 1B model is made with ../shared/gpu/make_random_model.py
# (or MODEL=DIR). Usage: bash loadtests/gpu_checks.sh warm|tests|engine|adapters|burst|serving|pairs|ab
# The first process on a machine to run new shapes compiles MLX's CUDA kernels (over a minute of engine
# warm-up for the 1B model on an H200, BENCHMARKS.md "Start-up"); later processes read them from disk.
# So run `warm` first on a fresh machine, and read a first run's start-up as compile time.
set -o pipefail
part=${1:?warm|tests|engine|adapters|burst|serving|pairs|ab}
OUT=${OUT:-loadtests/out/gpu}
mkdir -p "$OUT"
MODEL=${MODEL:-/tmp/m1b}
need_model() {
  [ -d "$MODEL" ] || python3 "${MAKE_MODEL:-../shared/gpu/make_random_model.py}" 1b "${TOK:-../shared/gpu/tok}" "$MODEL" bfloat16 > /dev/null
}
case "$part" in
  warm)  # a throw-away server start first on a fresh machine: it fills MLX's kernel cache (~130 s for
    # the 1B model on an H200), so that the measured parts that follow start in seconds
    need_model
    python3 -m parallm serve --model "$MODEL" --served-model-name bench --port 8123 --max-num-seqs 128 \
      $SERVE_ARGS > "$OUT/warm-serve.log" 2>&1 &
    spid=$!
    for _ in $(seq 1 600); do curl -sf http://127.0.0.1:8123/health > /dev/null && break; sleep 0.5; done
    curl -s http://127.0.0.1:8123/v1/completions -H 'Content-Type: application/json' \
      -d '{"model": "bench", "prompt": "warm", "max_tokens": 4}' | head -c 200; echo
    kill -TERM $spid; wait $spid; echo "server rc=$?"; grep -E "warmed up|compiled" "$OUT/warm-serve.log" ;;
  tests)  # the CUDA-only kernel tests and the mlx-lm comparisons that run through them
    timeout 280 python3 -m pytest -q -p no:cacheprovider tests/adapters/test_lora_kernel.py \
      tests/adapters/test_lora.py tests/engine/test_warm_up.py 2>&1 | tee "$OUT/tests.log" | tail -15
    timeout 280 python3 -m pytest -q -p no:cacheprovider -x tests/engine/test_decode_kernels.py 2>&1 | tail -5
    # every family batched on the device's own backend (CUDA: bucketed prefill padding, rings, state)
    PARALLM_TEST_DEVICE=gpu timeout 400 python3 -m pytest -q -p no:cacheprovider tests/models/test_families.py \
      tests/engine/test_engine.py tests/engine/test_kv_cache.py 2>&1 | tee "$OUT/families.log" | tail -15 ;;
  engine)  # the engine vs mlx-lm's BatchGenerator at batch 64 and 128 (and 8B single stream), random weights
    for shape in 1b 8b; do
      batches="64 128"; [ $shape = 8b ] && batches="1 64 128"
      timeout 280 python3 loadtests/bench_engine.py --random-llama $shape --dtype bfloat16 --batches $batches \
        --gen 128 --rounds 2 --json "$OUT/engine-$shape.json" 2>&1 | grep -E "^batch|^model"
    done ;;
  adapters)  # mixed/base at batch 32 and 64, default-model shape and Llama-1B shape
    # (the 1B ratio moves 0.68-0.92 between processes on one machine: run it more than once)
    timeout 120 python3 loadtests/bench_lora_kernel.py > "$OUT/lora-kernel.json" 2>&1; tail -c 600 "$OUT/lora-kernel.json"; echo
    for shape in smollm2-135m llama-1b llama-1b; do
      timeout 200 python3 loadtests/bench_adapters.py --shape $shape --batch 32 64 --adapters 8 --steps 40 \
        --dtype bfloat16 2>&1 | tail -4 | tee -a "$OUT/adapters-$shape.log"
    done ;;
  burst)  # first-burst TTFT straight into the engine, by warm-up kind, each in its own process
    need_model
    for w in none basic buckets; do
      timeout 150 python3 loadtests/bench_burst.py --model "$MODEL" --burst 64 --input-len 128 --output-len 128 \
        --rounds 3 --warm-up $w > "$OUT/burst-$w.log" 2>&1; echo "warm-up $w: rc=$?"; grep '^{' "$OUT/burst-$w.log"
    done ;;
  serving)  # the serving targets in one run: >= 4x mlx_lm.server and TTFT p99 <= 0.5 s at 64, 0 failures
    # at 128 and 256, >= 0.9 of the engine at 64 (BENCHMARKS.md, "Serving on the GPU"). Four load-generator
    # processes: one saturates near 6,000 tokens/s
    need_model
    timeout 560 python3 loadtests/bench_serving.py --compare --model "$MODEL" --engine-baseline --client-procs 4 \
      --parallm-args "--max-num-seqs 128 --max-queue 256" --concurrency 64,128,256 --requests-per-client 2 \
      --input-len 128 --output-len 128 --level-timeout 60 --no-plot --out "$OUT/serving.json" 2>&1 | tail -30 ;;
  pairs)  # the server / engine target alone: one server, ${REPS:-3} back-to-back server/engine pairs at 64
    # clients; bench_serving prints the pairs' geometric mean and its 95% interval (one pair moves +-0.15
    # with the host, so one pair does not settle the target)
    need_model
    python3 -m parallm serve --model "$MODEL" --served-model-name bench --port 8123 --max-num-seqs 128 \
      --max-queue 256 $SERVE_ARGS > "$OUT/pairs-serve.log" 2>&1 &
    spid=$!
    for _ in $(seq 1 600); do curl -sf http://127.0.0.1:8123/health > /dev/null && break; sleep 0.5; done
    timeout 280 python3 loadtests/bench_serving.py --url http://127.0.0.1:8123 --engine-baseline --client-procs 4 \
      --parallm-args "--max-num-seqs 128 --max-queue 256" --model "$MODEL" --concurrency 64 --reps ${REPS:-3} \
      --requests-per-client 4 --input-len 128 --output-len 128 --level-timeout 60 --no-plot \
      --out "$OUT/pairs.json" 2>&1 | tee "$OUT/pairs.log" | tail -16
    kill -TERM $spid; wait $spid; echo "server rc=$?" ;;
  ab)  # a change's A/B through the server: A=checkout root of the code before (e.g. `git archive BASE |
    # tar -x -C /tmp/base`), B (default .) the code after; two servers side by side, 64 clients, levels
    # interleaved ABBA so the host's drift cancels in the ratio; geometric mean and 95% interval printed
    need_model
    timeout 560 python3 loadtests/bench_serving.py --ab "${A:?A=checkout root of the baseline}" "${B:-.}" \
      --model "$MODEL" --parallm-args "--max-num-seqs 128 --max-queue 256" --client-procs 4 --concurrency 64 \
      --reps ${REPS:-6} --requests-per-client 4 --input-len 128 --output-len 128 --level-timeout 60 --no-plot \
      --out "$OUT/ab.json" 2>&1 | tee "$OUT/ab.log" | tail -16 ;;
  *) echo "unknown part: $part" >&2; exit 2 ;;
esac
