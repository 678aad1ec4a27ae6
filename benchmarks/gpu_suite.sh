#!/usr/bin/env bash
# The GPU measurements of the README's Performance section, as stages of one script for a CUDA machine.
#
# Usage (repo root, on the GPU machine):  bash benchmarks/gpu_suite.sh STAGE [STAGE ...]
#   tests        pytest -m gpu (CUDA graphs keep dropout masks fresh; compiled/fused/micro-batch curves = eager;
#                no host syncs), then the compiler tests of tests/test_speed.py under this machine's torch
#   speed-mlp    benchmarks/speed.py --model mlp: every training path, DataLoader with 0 and 4 workers
#   speed-lenet  benchmarks/speed.py --model lenet
#   ops          benchmarks/ops_per_step.py (MLP, LeNet, population): computing and syncing ops per step on CUDA
#                tensors; benchmarks/accuracy_update.py: TopOneAccuracy vs MulticlassAccuracy, µs per update;
#                benchmarks/stacked_loader.py: stacked training orders, one gather vs S gathers + stack
#   compile      benchmarks/compile_step.py --mode reduce-overhead: one step eager vs CUDA graphs, p = 0 and 0.5
#   mc           benchmarks/mc_dropout.py: vectorized mc_predict (with and without prefix sharing) vs a loop of
#                T forwards; benchmarks/dropout_kernel.py: F.dropout vs uniform masks on CUDA (cpu_only's reason)
#   population   benchmarks/population.py, then the whole swap study (seeds 0-2) as `study --population`, timed
#                (start-up, 10 epochs, test, report), as configured and with micro-batches 8 + CUDA graphs + TF32
#   jobs         benchmarks/study_jobs.py: does `study --jobs 2` help on one GPU?
#   all          every stage above (longer than one 10-minute device call: split it, e.g.
#                "tests ops speed-mlp", "speed-lenet compile mc", "population jobs")
#
# Inputs: $FASHION_MNIST_DIR (default .gpu/data: the four *-ubyte.gz files) and, if the machine lacks
# jsonargparse, its wheels in .gpu/whl (installed into /tmp/site). Logs go to $OUT (default results/gpu), one
# file per stage. Set PYTHON to choose the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
stages=("$@")
[ ${#stages[@]} -eq 0 ] && { sed -n '2,22p' "$0"; exit 2; }
[ "${stages[0]}" = all ] && stages=(tests ops speed-mlp speed-lenet compile mc population jobs)
for stage in "${stages[@]}"; do
    case $stage in tests | ops | speed-mlp | speed-lenet | compile | mc | population | jobs) ;;
        *) echo "unknown stage: $stage (see the header of $0)" >&2; exit 2 ;;
    esac
done
out=${OUT:-results/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-$PWD/.gpu/data} PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c "import jsonargparse" 2>/dev/null && compgen -G ".gpu/whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
        || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

failed=()
run() {  # run NAME CMD...: echo, run, keep the log; a failing stage does not stop the others
    local name=$1; shift
    echo "== $name: $*" | tee -a "$out/$name.log"
    local start=$SECONDS
    "$@" 2>&1 | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/$name.log"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

population_study() {  # the swap study (8 cells x seeds 0-2) through `study --population`, extra fit args appended
    local tmp
    tmp=$(mktemp -d)
    "$py" -m dropout_lab study --config configs/studies/swap.yaml --seeds 0 1 2 --population --out "$tmp/out" \
        --logdir "$tmp/logs" -- --trainer.accelerator gpu --trainer.enable_progress_bar false \
        --data.data_dir "$tmp/data" "$@"
    local status=$?
    cat "$tmp/out/swap.md" 2>/dev/null
    rm -rf "$tmp"
    return $status
}

"$py" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
for stage in "${stages[@]}"; do
    case $stage in
        tests)
            run tests "$py" -m pytest -m gpu -q -p no:cacheprovider tests
            # CPU tests that depend on the torch version (the GPU machine's differs from CI's)
            run tests-compile "$py" -m pytest -q -p no:cacheprovider tests/test_speed.py -k "graph_breaks or compiled" ;;
        ops)
            run ops-mlp "$py" benchmarks/ops_per_step.py --model mlp --device gpu
            run ops-lenet "$py" benchmarks/ops_per_step.py --model lenet --device gpu
            run ops-population "$py" benchmarks/ops_per_step.py --model population --device gpu
            run accuracy-update "$py" benchmarks/accuracy_update.py --device gpu
            run stacked-loader "$py" benchmarks/stacked_loader.py --orders 3 5 24 --device gpu ;;
        speed-mlp) run speed-mlp "$py" benchmarks/speed.py --model mlp --rounds 3 --workers 0 4 ;;
        speed-lenet) run speed-lenet "$py" benchmarks/speed.py --model lenet --rounds 3 --workers 4 ;;
        compile) run compile "$py" benchmarks/compile_step.py --mode reduce-overhead --device gpu ;;
        mc)
            run mc "$py" benchmarks/mc_dropout.py --rounds 3 --device gpu
            run dropout-kernel "$py" benchmarks/dropout_kernel.py --rounds 3 --device gpu --mc-images 10000 ;;
        population)
            run population "$py" benchmarks/population.py --rounds 2 --device gpu --precisions 32-true bf16-mixed
            run population-study population_study
            run population-study-fast population_study --data.batch_size 2048 --model.init_args.micro_batch_size 256 \
                --trainer.callbacks+=dropout_lab.speed.CompileModule --trainer.callbacks.mode reduce-overhead \
                --float32_matmul_precision high ;;
        jobs) run jobs "$py" benchmarks/study_jobs.py --seeds 0 --jobs 1 2 ;;
    esac
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed stages: ${failed[*]}" >&2
    exit 1
fi
