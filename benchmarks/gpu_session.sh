#!/usr/bin/env bash
# One device call: install what the GPU image lacks (carried wheels in .whl/), then the chosen
# steps; logs land in $OUT.
# Usage on the device: bash benchmarks/gpu_session.sh [tests|kernels|sweep|train|profile|multi|all]...
#    or: bash benchmarks/gpu_session.sh lanes "STEPS" "STEPS" ...   (lane i on GPU i, in parallel)
#   tests    every GPU-marked test (fla's comparison only with FLA_TESTS=1: it autotunes for minutes)
#   tests:P  the GPU-marked tests under the comma-separated paths P (e.g. tests:tests/kernels,tests/hf)
#   kernels  bench_gdn2.py side by side with fla (fla's first call at a shape autotunes ~200 s)
#   sweep    bench_gdn2.py --sweep "$SWEEP" at $SWEEP_SHAPE (launch-configuration variants, ours only)
#   sweep:S  the same at shape S (e.g. sweep:1x16384), with the variants of $SWEEP_S if it is set
#   mixer    bench_mixer_inputs.py (the fused Triton input stage beside the compiled PyTorch one)
#   rotary   bench_rotary_split.py (the SWA split with RoPE: Triton beside torch.compile)
#   ce       bench_cross_entropy.py (the loss beside Megatron's fused and unfused cross entropy)
#   swa      bench_swa.py ${SWA_ARGS} (FlexAttention options for the SWA layers, flash SDPA beside)
#   train    train_throughput.py ${TRAIN_ARGS}     profile  train_throughput.py --profile
#   train:X  train_throughput.py ${TRAIN_ARGS_X} into train_throughput_X.log (variants side by side)
#   multi    multi_gpu.py all (every GPU of the machine; NCCL_NVLS_ENABLE=0)
#   sleep:N  wait N seconds before the lane's next step
# Triton's autotune results are cached on disk (TRITON_CACHE_AUTOTUNING): `kernels` leaves them in
# $OUT/triton_autotune.tgz; carried back as .whl/triton_autotune.tgz they spare fla's minutes of
# tuning in a later call (our kernels do not autotune).
# ../shared/data does not travel to the device: copy what the tests read into data_cache/shared
# (gitignored; corpora/wikipedia_vital_summaries, eval, tokenizers/mistral_v1) and carry it with
# .whl. Run independent steps on separate GPUs of a multi-GPU machine with CUDA_VISIBLE_DEVICES.
set -uo pipefail
OUT=${OUT:-/tmp/gdn2_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache} TRITON_CACHE_AUTOTUNING=1
if [ -d data_cache/shared ]; then export GDN2_SHARED_DATA=$PWD/data_cache/shared; fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "${1:-}" = lanes ]; then
    shift
    bash "$0" none || exit 1
    pids=()
    for i in $(seq 0 $(($# - 1))); do
        lane=$((i + 1))
        # shellcheck disable=SC2086
        GDN2_INSTALLED=1 CUDA_VISIBLE_DEVICES=$i timeout "${LANE_TIMEOUT:-540}" bash "$0" ${!lane} \
            >"$OUT/lane$i.log" 2>&1 &
        pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    # only a few files come back from the device: everything in one archive
    tar -czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/"
    exit "$status"
fi
[ "${GDN2_INSTALLED:-0}" = 1 ] || {
mkdir -p "$TRITON_CACHE_DIR"
[ -f .whl/triton_autotune.tgz ] && tar -xzf .whl/triton_autotune.tgz -C "$TRITON_CACHE_DIR"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch, triton, megatron.core as m; print("torch", torch.__version__, "triton", triton.__version__, "mcore", m.__version__)'
}

status=0
for step in "${@:-all}"; do
    case "$step" in
    tests | tests:* | all)
        # fla's kernels autotune for minutes on first use: its comparison runs only with FLA_TESTS=1.
        deselect=()
        [ "${FLA_TESTS:-0}" = 1 ] || deselect=(--deselect tests/kernels/test_gdn2_interface.py::test_fla_backend_matches_reference)
        paths=tests log=gpu_tests.log
        case "$step" in tests:*) paths=${step#tests:}; log="gpu_tests_${paths//[\/,]/_}.log" ;; esac
        # shellcheck disable=SC2046
        python3 -m pytest -v -rfE -m gpu -p no:cacheprovider --durations=10 --timeout "${TEST_TIMEOUT:-300}" \
            "${deselect[@]}" $(tr , ' ' <<<"$paths") 2>&1 \
            | tee "$OUT/$log" | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E " | tail -60
        status=$((status | PIPESTATUS[0])) ;;&
    kernels | all)
        timeout "${KERNELS_TIMEOUT:-3000}" python3 benchmarks/bench_gdn2.py ${BENCH_ARGS:-} 2>&1 \
            | tee "$OUT/bench_gdn2.log" | tail -40
        status=$((status | PIPESTATUS[0]))
        (cd "$TRITON_CACHE_DIR" && find . -name "*.autotune.json" | tar -czf "$OUT/triton_autotune.tgz" -T -) ;;&
    sweep | sweep:*)
        shape=${SWEEP_SHAPE:-4x4096}
        [ "$step" = sweep ] || shape=${step#sweep:}
        variants_var=SWEEP_$shape
        python3 benchmarks/bench_gdn2.py --shapes "$shape" --sweep "${!variants_var:-${SWEEP:-}}" --out "$OUT/sweep_$shape" 2>&1 \
            | tee "$OUT/bench_sweep_$shape.log" | grep -E "fwd|chunk_|total|failed"
        status=$((status | PIPESTATUS[0])) ;;
    mixer)
        python3 benchmarks/bench_mixer_inputs.py 2>&1 | tee "$OUT/bench_mixer_inputs.log" | tail -8
        status=$((status | PIPESTATUS[0])) ;;
    rotary)
        python3 benchmarks/bench_rotary_split.py 2>&1 | tee "$OUT/bench_rotary_split.log" | tail -8
        status=$((status | PIPESTATUS[0])) ;;
    ce)
        python3 benchmarks/bench_cross_entropy.py 2>&1 | tee "$OUT/bench_cross_entropy.log" | tail -12
        status=$((status | PIPESTATUS[0])) ;;
    swa)
        # shellcheck disable=SC2086
        python3 benchmarks/bench_swa.py ${SWA_ARGS:-} 2>&1 | tee "$OUT/bench_swa.log" | tail -12
        status=$((status | PIPESTATUS[0])) ;;
    profile)
        python3 benchmarks/train_throughput.py --profile 2>&1 | tee "$OUT/profile_run.log" | tail -40
        status=$((status | PIPESTATUS[0])) ;;
    train | train:* | all)
        # train:X takes ${TRAIN_ARGS_X} and writes throughput.md into its own folder (parallel lanes
        # would overwrite one another's); train and all take ${TRAIN_ARGS}
        variant=${step#train:}
        if [ "$variant" = "$step" ]; then
            args_var=TRAIN_ARGS dir=$OUT log=train_throughput.log
        else
            args_var=TRAIN_ARGS_$variant dir=$OUT/$variant log=train_throughput_$variant.log
        fi
        mkdir -p "$dir"
        # shellcheck disable=SC2086
        OUT="$dir" python3 benchmarks/train_throughput.py ${!args_var:-} 2>&1 | tee "$OUT/$log" | tail -60
        status=$((status | PIPESTATUS[0])) ;;&
    sleep:*)
        # lets another lane's timed first call compile alone (Triton compiles on the host's CPUs)
        sleep "${step#sleep:}" ;;
    multi | all)
        python3 benchmarks/multi_gpu.py all --workdir /tmp/mg ${MULTI_ARGS:-} 2>&1 | tee "$OUT/multi_gpu.log" | tail -60
        status=$((status | PIPESTATUS[0])) ;;
    esac
done
exit "$status"
