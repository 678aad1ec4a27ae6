#!/usr/bin/env bash
# The GPU measurements of the README's Performance section, as stages of one script for a CUDA machine.
#
# Usage (repo root, on the GPU machine):  bash benchmarks/gpu_suite.sh STAGE [STAGE ...]
#   goals        what a session's 15 minutes of device time should buy first, in one call of about 9 minutes on
#                an H100 (estimated, not yet run): tests, fit-mlp, fit-lenet, mc-goal, population-fast,
#                speed-mlp-core, dispatch, in that order, so that a deadline cuts the least needed
#   tests        pytest -m gpu (CUDA graphs keep dropout masks fresh; compiled/fused/micro-batch curves = eager;
#                no host syncs), then the compiler tests of tests/test_speed.py under this machine's torch
#   fit-mlp      `python -m dropout_lab fit` through the CLI, seed 0, 10 epochs and the test, with EpochTimer's
#                s/epoch: configs/mlp_fast.yaml, then configs/mlp.yaml (the eager Lightning baseline)
#   fit-lenet    the same for configs/lenet_fast.yaml and configs/lenet.yaml
#   speed-mlp    benchmarks/speed.py --model mlp: every training path, DataLoader with 0 and 4 workers
#   speed-mlp-core  the same, 2 rounds, for the issue's rows: DataLoader(4 workers), tensor loader, + micro-batches
#                (and the same through Lightning's dispatch), + micro-batches + CUDA graphs + fused, bare eager loop,
#                bare loop + CUDA graphs + fused
#   speed-lenet  benchmarks/speed.py --model lenet
#   ops          benchmarks/ops_per_step.py (MLP, LeNet, population): computing and syncing ops per step on CUDA
#                tensors; benchmarks/accuracy_update.py: TopOneAccuracy vs MulticlassAccuracy, µs per update;
#                benchmarks/stacked_loader.py: stacked training orders, one gather vs S gathers + stack;
#                benchmarks/gather.py: the loader's gather, images[idx] vs index_select
#   dispatch     benchmarks/step_dispatch.py: µs of a micro-batch's backward + optimizer step, Lightning's
#                dispatch vs DirectSteps vs bare PyTorch
#   compile      benchmarks/compile_step.py --mode reduce-overhead: one step eager vs CUDA graphs, p = 0 and 0.5
#   mc-goal      benchmarks/mc_dropout.py, 2 rounds: vectorized mc_predict vs a loop of T forwards
#   mc           mc-goal with 3 rounds, then benchmarks/dropout_kernel.py: F.dropout vs uniform masks on CUDA
#   population   benchmarks/population.py, then population-study and population-fast
#   population-study  the whole swap study (seeds 0-2) as `study --population`, timed (start-up, 10 epochs,
#                test, report), as configured
#   population-fast   the same with micro-batches 8 + CUDA graphs + TF32
#   jobs         benchmarks/study_jobs.py: does `study --jobs 2` help on one GPU?
#   all          every stage above but goals (far longer than one 10-minute device call: split it)
#
# Inputs: $FASHION_MNIST_DIR (default .gpu/data: the four *-ubyte.gz files) and, if the machine lacks
# jsonargparse, its wheels in .gpu/whl or $SUITE_WHEELS (installed into /tmp/site); `bash benchmarks/gpu_inputs.sh` fills .gpu/
# where PyPI is reachable. Everything goes to one log, $OUT/suite.log (default results/gpu).
# Environment: PYTHON (interpreter, default python3); SUITE_DEVICE (gpu, or cpu to rehearse the suite on a
# machine without one; default gpu); SUITE_DEADLINE_S (skip the commands that would start after this many
# seconds; default none); COMMAND_TIMEOUT_S (stop a command after this many seconds, default 420);
# SUITE_FIT_ARGS (more arguments for every `fit` of fit-* and population-*, e.g. "--trainer.max_epochs 2" for a
# quick rehearsal); DRY_RUN=1 (print the commands only).
set -uo pipefail
cd "$(dirname "$0")/.."
stages=("$@")
[ ${#stages[@]} -eq 0 ] && { sed -n '2,/^set /{/^set /!p}' "$0"; exit 2; }
expanded=()
for stage in "${stages[@]}"; do
    case $stage in
        goals) expanded+=(tests fit-mlp fit-lenet mc-goal population-fast speed-mlp-core dispatch) ;;
        all) expanded+=(tests fit-mlp fit-lenet ops dispatch speed-mlp speed-lenet compile mc population
            population-study population-fast jobs) ;;
        population) expanded+=(population population-study population-fast) ;;
        tests | fit-mlp | fit-lenet | speed-mlp | speed-mlp-core | speed-lenet | ops | dispatch | compile | mc-goal | mc \
            | population-study | population-fast | jobs) expanded+=("$stage") ;;
        *) echo "unknown stage: $stage (see the header of $0)" >&2; exit 2 ;;
    esac
done
dev=${SUITE_DEVICE:-gpu}
case $dev in gpu | cpu) ;; *) echo "SUITE_DEVICE must be gpu or cpu, not $dev" >&2; exit 2 ;; esac
graphs=reduce-overhead
[ "$dev" = cpu ] && graphs=default  # speed.py's row labels: CUDA graphs exist only on the GPU
out=${OUT:-results/gpu}
py=${PYTHON:-python3}
deadline=${SUITE_DEADLINE_S:-}
command_timeout=${COMMAND_TIMEOUT_S:-420}
dry=${DRY_RUN:-0}
mkdir -p "$out"
log=$out/suite.log
export FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-$PWD/.gpu/data} PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
wheels=${SUITE_WHEELS:-.gpu/whl}
if [ "$dry" != 1 ] && ! "$py" -c "import jsonargparse" 2>/dev/null && compgen -G "$wheels/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
        || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

failed=() summary=()
run() {  # run NAME CMD...: echo, run under the command timeout, log; a failing command does not stop the others
    local name=$1; shift
    if [ "$dry" = 1 ]; then printf '%s:' "$name"; printf ' %q' "$@"; echo; return; fi
    if [ -n "$deadline" ] && [ "$SECONDS" -ge "$deadline" ]; then
        echo "== $name: skipped, the suite is past SUITE_DEADLINE_S=$deadline s" | tee -a "$log"
        summary+=("$name skipped"); return
    fi
    echo "== $name: $*" | tee -a "$log"
    local start=$SECONDS
    local cmd=("$@")
    declare -F "$1" >/dev/null && cmd=(bash -c '"$@"' _ "$@")  # a function of this script: exported below
    timeout --kill-after=20 "$command_timeout" "${cmd[@]}" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "== $name: stopped by COMMAND_TIMEOUT_S=$command_timeout" | tee -a "$log"
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    summary+=("$name exit $rc after $((SECONDS - start)) s")
    [ "$rc" -eq 0 ] || failed+=("$name")
}

population_study() {  # the swap study (8 cells x seeds 0-2) through `study --population`, extra fit args appended
    local tmp
    tmp=$(mktemp -d)
    "$py" -m dropout_lab study --config configs/studies/swap.yaml --seeds 0 1 2 --population --out "$tmp/out" \
        --logdir "$tmp/logs" -- --trainer.accelerator "$dev" --trainer.enable_progress_bar false \
        --data.data_dir "$tmp/data" "$@" $SUITE_FIT_ARGS
    local status=$?
    cat "$tmp/out/swap.md" 2>/dev/null
    rm -rf "$tmp"
    return $status
}

cli_fit() {  # cli_fit CONFIG [ARGS...]: seed 0 through the CLI, with EpochTimer (unless the config has it), then test
    local config=$1 tmp; shift
    tmp=$(mktemp -d)
    local timer=(--trainer.callbacks+=dropout_lab.speed.EpochTimer)
    grep -q "dropout_lab.speed.EpochTimer" "$config" && timer=()
    "$py" -m dropout_lab fit --config "$config" --seed_everything 0 --trainer.accelerator "$dev" \
        --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir "$tmp/logs" "${timer[@]}" "$@" \
        $SUITE_FIT_ARGS
    local status=$?
    rm -rf "$tmp"
    return $status
}

export -f population_study cli_fit
export py dev SUITE_FIT_ARGS=${SUITE_FIT_ARGS:-}  # word-split on purpose: extra arguments of every fit
core_paths=(  # the issue's rows of benchmarks/speed.py
    "trainer, DataLoader(4 workers)" "trainer, tensor loader" "trainer, tensor loader + micro-batches 8"
    "trainer, tensor loader + micro-batches 8 + lightning dispatch"
    "trainer, tensor loader + micro-batches 8 + compile($graphs) + fused" "bare loop, eager"
    "bare loop + compile($graphs) + fused"
)

versions="import torch, lightning, torchmetrics, jsonargparse as j; print('device:', torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'no CUDA', '| torch', torch.__version__, '| lightning', lightning.__version__, \
'| torchmetrics', torchmetrics.__version__, '| jsonargparse', j.__version__)"
[ "$dry" = 1 ] || "$py" -c "$versions" 2>&1 | tee -a "$log"
for stage in "${expanded[@]}"; do
    case $stage in
        tests)
            run tests "$py" -m pytest -m gpu -q -p no:cacheprovider tests
            # CPU tests that depend on the torch version (the GPU machine's differs from CI's)
            run tests-compile "$py" -m pytest -q -p no:cacheprovider tests/test_speed.py -k "graph_breaks or compiled" ;;
        fit-mlp)
            run fit-mlp-fast cli_fit configs/mlp_fast.yaml
            run fit-mlp cli_fit configs/mlp.yaml ;;
        fit-lenet)
            run fit-lenet-fast cli_fit configs/lenet_fast.yaml
            run fit-lenet cli_fit configs/lenet.yaml ;;
        ops)
            run ops-mlp "$py" benchmarks/ops_per_step.py --model mlp --device "$dev"
            run ops-lenet "$py" benchmarks/ops_per_step.py --model lenet --device "$dev"
            run ops-population "$py" benchmarks/ops_per_step.py --model population --device "$dev"
            run accuracy-update "$py" benchmarks/accuracy_update.py --device "$dev"
            run stacked-loader "$py" benchmarks/stacked_loader.py --orders 3 5 24 --device "$dev"
            run gather "$py" benchmarks/gather.py --device "$dev" ;;
        speed-mlp) run speed-mlp "$py" benchmarks/speed.py --model mlp --device "$dev" --rounds 3 --workers 0 4 ;;
        speed-mlp-core)
            run speed-mlp-core "$py" benchmarks/speed.py --model mlp --device "$dev" --rounds 2 --workers 4 \
                --paths "${core_paths[@]}" ;;
        speed-lenet) run speed-lenet "$py" benchmarks/speed.py --model lenet --device "$dev" --rounds 3 --workers 4 ;;
        dispatch) run step-dispatch "$py" benchmarks/step_dispatch.py --rounds 5 --device "$dev" ;;
        compile) run compile "$py" benchmarks/compile_step.py --mode "$graphs" --device "$dev" ;;
        mc-goal) run mc "$py" benchmarks/mc_dropout.py --rounds 2 --device "$dev" ;;
        mc)
            run mc "$py" benchmarks/mc_dropout.py --rounds 3 --device "$dev"
            run dropout-kernel "$py" benchmarks/dropout_kernel.py --rounds 3 --device "$dev" --mc-images 10000 ;;
        population)  # expanded above to this benchmark, then population-study and population-fast
            run population "$py" benchmarks/population.py --rounds 2 --device "$dev" --precisions 32-true bf16-mixed ;;
        population-study) run population-study population_study ;;
        population-fast)
            run population-fast population_study --data.batch_size 2048 --model.init_args.micro_batch_size 256 \
                --trainer.callbacks+=dropout_lab.speed.CompileModule --trainer.callbacks.mode "$graphs" \
                --float32_matmul_precision high ;;
        jobs) run jobs "$py" benchmarks/study_jobs.py --seeds 0 --jobs 1 2 ;;
    esac
done
[ "$dry" = 1 ] && exit 0
printf '%s\n' "" "== summary (${SECONDS} s in all)" "${summary[@]}" | tee -a "$log"
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}" | tee -a "$log" >&2
    exit 1
fi
