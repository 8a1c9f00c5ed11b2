#!/usr/bin/env bash
# The one script a freshly lent GPU machine runs first (benchmarks/README.md#gpu_checksh): under 8 minutes on one
# H100/H200, each phase time-boxed, ONE table at the end (phase | result | numbers | seconds).
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine, from anywhere; results in $OUT
#   bash benchmarks/gpu_check.sh --cpu-dry-run        # every phase on the CPU, tiny sizes (tests/test_gpu_check.py)
#   bash benchmarks/gpu_check.sh --only data,masks    # rerun some phases into the same --out; the other rows stay
#   bash benchmarks/gpu_check.sh --list               # the phases and their budgets
#
# Options: --out DIR (default $OUT, else /tmp/gpu-check): the table (table.md, table.json), log.txt
# (every phase's output) and the bench JSON files, at most 8 files, rewritten by each run. --work DIR (default
# /tmp/cfmae-gpu-check): scratch (installed wheels, datasets, run folders); each phase empties its own subfolder
# first. --wheels DIR (default .whl in the repository; the dry run only with --wheels): carried wheels, installed
# into WORK/site by `setup`.
# Environment: PYTHON (default .venv/bin/python when present, else python3); for tests of this script,
# GPU_CHECK_FAIL=PHASE[,PHASE] makes those phases fail at their start, GPU_CHECK_HANG=PHASE[,...] makes them
# sleep until their budget kills them, GPU_CHECK_BUDGETS=PHASE=S[,...] overrides budgets (seconds);
# GPU_CHECK_DRY_DDP=1 makes the dry run compare 2 gloo CPU processes with 1 for nccl_2gpu (+~30 s).
# Exit: 0 when no row of the table is FAIL or TIMEOUT, 1 otherwise, 2 for bad options or no GPU (without
# --cpu-dry-run).
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
TABLE="$REPO/benchmarks/gpu_check_table.py"
RUNS="$REPO/benchmarks/gpu_check_runs.py"

PHASES=(setup cuda_tests step_eager step_compiled data bf16_fp32 sigterm_resume nccl_2gpu masks)
# seconds per phase on the GPU; the whole check is also held to TOTAL (a phase gets what is left, at most)
declare -A BUDGET=([setup]=45 [cuda_tests]=50 [step_eager]=50 [step_compiled]=120 [data]=75 [bf16_fp32]=45
                   [sigterm_resume]=60 [nccl_2gpu]=60 [masks]=25)
TOTAL=450        # 7.5 minutes of phases: the table follows within seconds
DRY_BUDGET=180   # each phase of --cpu-dry-run: only a guard against a hang (~60 s in all on 2 idle cores)
DRY_TOTAL=900

# ---------------------------------------------------------------------------------------------- the phases
# Each runs in its own bash process (under timeout) in DIR=$WORK/<phase>, emptied first, and leaves
# DIR/result.json; gpu_check_table.py record turns that (or the exit code) into the row.

tiny_sets() {  # tests/conftest.py's TINY_OVERRIDES as --set arguments, read without importing anything
    "$PY" - <<'PY'
import ast
tree = ast.parse(open("tests/conftest.py").read())
sets = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
            and getattr(n.targets[0], "id", "") == "TINY_OVERRIDES")
print(" ".join(f"--set {s}" for s in sets + ["train.threads=1"]))
PY
}

bench() {  # bench NAME.json ARGS...: cfmae bench, the JSON kept in OUT as NAME.json
    local name=$1; shift
    if [[ $DRY == 1 ]]; then
        # shellcheck disable=SC2046
        "$PY" -m cfmae_cli bench --device cpu --preset demo $(tiny_sets) --classes 3 "$@" --out "$DIR/$name"
    else
        "$PY" -m cfmae_cli bench --device cuda --preset vitb-400e "$@" --out "$DIR/$name"
    fi
    cp "$DIR/$name" "$OUT/$name"
}

phase_setup() {
    rm -rf "$WORK/site"; mkdir -p "$WORK/site"
    "$PY" benchmarks/gpu_check_setup.py --site "$WORK/site" --wheels "$WHEELS" --result "$DIR/result.json" \
        $([[ $DRY == 1 ]] || echo --index)  # the dry run never reaches for the network
}

phase_cuda_tests() {  # the tests with CUDA-only parts: the files that skip without CUDA, their cuda/gpu cases
    local files
    files=$(grep -l 'skipif(not torch.cuda.is_available()' tests/test_*.py | tr '\n' ' ')
    [[ -n $files ]] || { echo "no test file has a CUDA-only part (skipif(not torch.cuda.is_available()...)"; exit 1; }
    echo "files: $files"
    if [[ $GPUS == 0 ]]; then  # collect only: the selection must still find tests
        # shellcheck disable=SC2086
        "$PY" -m pytest -p no:cacheprovider --co -q $files -k "cuda or gpu" | tee "$DIR/collected.txt"
        local n; n=$(grep -c '::' "$DIR/collected.txt" || true)
        [[ $n -gt 0 ]] || { echo "the selection -k 'cuda or gpu' found no test"; exit 1; }
        "$PY" "$TABLE" skip --result "$DIR/result.json" --why "no CUDA" --numbers "$n CUDA tests collected in $files"
    else
        # shellcheck disable=SC2086
        "$PY" -m pytest -p no:cacheprovider -q $files -k "cuda or gpu" --junitxml="$DIR/junit.xml" || true
        "$PY" "$TABLE" junit "$DIR/junit.xml" --result "$DIR/result.json"
    fi
}

step_args() { if [[ $DRY == 1 ]]; then echo "--batch-size 4 --steps 2 --warmup 1"; else echo "--batch-size 256 --steps 20 --warmup 5"; fi; }

phase_step_eager() {
    # shellcheck disable=SC2046
    bench step-eager.json --what step $(step_args) --compare "$([[ $DRY == 1 ]] && echo none || echo mae-vitb)"
    "$PY" "$TABLE" step "$DIR/step-eager.json" --result "$DIR/result.json"
}

phase_step_compiled() {  # the dry run cannot afford inductor on 2 cores (~3 min): torch.compile is switched off
    if [[ $DRY == 1 ]]; then export TORCH_COMPILE_DISABLE=1; fi
    # shellcheck disable=SC2046
    bench step-compiled.json --what step --compile $(step_args) --compare none
    "$PY" "$TABLE" step "$DIR/step-compiled.json" --result "$DIR/result.json"
    if [[ $DRY == 1 ]]; then sed -i 's/"numbers": "/"numbers": "TORCH_COMPILE_DISABLE=1 (dry run); /' "$DIR/result.json"; fi
}

phase_data() {  # the bench's readers (CPU decode, and GPU decode where it has them); where its rows name no GPU
    # reader but the config takes data.decode=gpu, a second bench with that key
    local files=("$DIR/data.json")
    if [[ $DRY == 1 ]]; then
        "$PY" "$RUNS" dataset --data "$WORK/tiny-data"
        bench data.json --what data --compare none --workers 0 --data "$WORK/tiny-data"
    else
        bench data.json --what data --compare none --workers 1,8,16
        if ! grep -qiE '": "[^"]*gpu[^"]*"' "$DIR/data.json" && "$PY" -c "from cfmae_cli.config import load_config
load_config('vitb-400e', ['data.decode=gpu'])" 2>/dev/null; then
            bench data-gpu.json --what data --compare none --workers 1,8,16 --set data.decode=gpu
            files+=("$DIR/data-gpu.json")
        fi
    fi
    "$PY" "$TABLE" data "${files[@]}" --result "$DIR/result.json"
}

phase_bf16_fp32() { "$PY" "$RUNS" precision --work "$DIR" --data "$WORK/tiny-data" --gpus "$(( GPUS > 0 ))"; }

phase_sigterm_resume() { "$PY" "$RUNS" resume --work "$DIR" --data "$WORK/tiny-data" --gpus "$(( GPUS > 0 ))"; }

phase_nccl_2gpu() {
    if [[ $DRY == 1 && ${GPU_CHECK_DRY_DDP:-0} == 1 ]]; then  # the same comparison over gloo, 2 CPU processes
        "$PY" "$RUNS" ddp --work "$DIR" --data "$WORK/tiny-data" --gpus 0
        sed -i 's/"result": "PASS"/"result": "SKIPPED (no CUDA; gloo stand-in passed)"/' "$DIR/result.json"
    elif [[ $GPUS == 0 ]]; then
        "$PY" "$TABLE" skip --result "$DIR/result.json" --why "no CUDA" --numbers "GPU_CHECK_DRY_DDP=1: gloo stand-in"
    elif [[ $GPUS -lt 2 ]]; then
        "$PY" "$TABLE" skip --result "$DIR/result.json" --why "$GPUS GPU: needs 2"
    else
        "$PY" "$RUNS" ddp --work "$DIR" --data "$WORK/tiny-data" --gpus 2
    fi
}

phase_masks() {
    bench masks.json --what masks --compare none --mask-batch "$([[ $DRY == 1 ]] && echo 8 || echo 256)"
    "$PY" "$TABLE" masks "$DIR/masks.json" --result "$DIR/result.json"
}

in_list() { [[ ",$2," == *",$1,"* ]]; }

if [[ "${1:-}" == "--_phase" ]]; then  # internal: one phase, in the environment the parent exported
    set -eo pipefail
    NAME=$2; DIR="$WORK/$NAME"
    if in_list "$NAME" "${GPU_CHECK_FAIL:-}"; then echo "failure injected (GPU_CHECK_FAIL=$GPU_CHECK_FAIL)"; exit 3; fi
    if in_list "$NAME" "${GPU_CHECK_HANG:-}"; then echo "hang injected (GPU_CHECK_HANG)"; sleep 100000; fi
    "phase_$NAME"
    exit
fi

# ---------------------------------------------------------------------------------------------- the driver
usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
DRY=0; ONLY=""; OUT="${OUT:-/tmp/gpu-check}"; WORK=/tmp/cfmae-gpu-check; WHEELS="$REPO/.whl"; WHEELS_GIVEN=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --cpu-dry-run) DRY=1 ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        --work) WORK=${2:?--work needs a folder}; shift ;;
        --wheels) WHEELS=${2:?--wheels needs a folder}; WHEELS_GIVEN=1; shift ;;
        --only) ONLY=${2:?--only needs PHASE[,PHASE]}; shift ;;
        --list) for p in "${PHASES[@]}"; do echo "$p ${BUDGET[$p]} s"; done; echo "total at most $TOTAL s"; exit 0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for p in ${ONLY//,/ }; do in_list "$p" "$(IFS=,; echo "${PHASES[*]}")" || {
    echo "gpu_check.sh: --only $p: no such phase (${PHASES[*]})" >&2; exit 2; }; done
PY=${PYTHON:-$([[ -x "$REPO/.venv/bin/python" ]] && echo "$REPO/.venv/bin/python" || echo python3)}
if [[ $DRY == 1 ]]; then
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
    TOTAL=$DRY_TOTAL; for p in "${PHASES[@]}"; do BUDGET[$p]=$DRY_BUDGET; done
    [[ $WHEELS_GIVEN == 1 ]] || WHEELS=/nonexistent  # .whl holds the GPU machine's (Python 3.12) wheels
    GPUS=0
else
    GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())") || { echo "gpu_check.sh: $PY cannot import torch" >&2; exit 2; }
    [[ $GPUS -gt 0 ]] || { echo "gpu_check.sh: no GPU visible; --cpu-dry-run runs the check on the CPU" >&2; exit 2; }
fi
IFS=, read -ra KVS <<< "${GPU_CHECK_BUDGETS:-}"
for kv in "${KVS[@]}"; do BUDGET[${kv%%=*}]=${kv#*=}; done
mkdir -p "$OUT" "$WORK" || exit 2
OUT=$(cd "$OUT" && pwd); WORK=$(cd "$WORK" && pwd)
export PY OUT WORK WHEELS DRY GPUS TABLE RUNS PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    PYTHONPATH="$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"

KEEP=""; [[ -n $ONLY ]] && KEEP=--keep   # a rerun of some phases keeps the other rows of the last table
if [[ -z $ONLY ]]; then  # a fresh table: this script's files in OUT go, nothing else
    (cd "$OUT" && rm -f table.json table.md step-eager.json step-compiled.json data.json data-gpu.json \
        masks.json) && : > "$OUT/log.txt"
fi
touch "$OUT/log.txt"
echo "gpu_check: $([[ $DRY == 1 ]] && echo 'CPU dry run' || echo "$GPUS GPU(s)"), out $OUT, work $WORK, python $PY"
start_all=$(date +%s)
for p in "${PHASES[@]}"; do
    [[ -z $ONLY ]] || in_list "$p" "$ONLY" || continue
    left=$(( TOTAL - ($(date +%s) - start_all) ))
    budget=$(( BUDGET[$p] < left ? BUDGET[$p] : left ))
    rm -rf "${WORK:?}/$p"; mkdir -p "$WORK/$p"
    if [[ $left -lt 5 ]]; then
        "$PY" "$TABLE" skip --result "$WORK/$p/result.json" --why "the ${TOTAL}-s budget of the check is spent"
        "$PY" "$TABLE" record --table "$OUT/table.json" --phase "$p" --rc 0 --seconds 0 --dir "$WORK/$p" $KEEP
        KEEP=--keep; continue
    fi
    echo "== $p (budget $budget s) =="
    t0=$(date +%s%N)
    timeout -k 5 "$budget" bash "${BASH_SOURCE[0]}" --_phase "$p" >"$WORK/$p/log.txt" 2>&1
    rc=$?
    ms=$(( ($(date +%s%N) - t0) / 1000000 )); secs="$(( ms / 1000 )).$(( ms % 1000 / 100 ))"
    { echo "===== $p: exit $rc, $secs s ====="; cat "$WORK/$p/log.txt"; } >> "$OUT/log.txt"
    tail -n 3 "$WORK/$p/log.txt" | cut -c1-200 | sed 's/^/   | /'
    "$PY" "$TABLE" record --table "$OUT/table.json" --phase "$p" --rc "$rc" --seconds "$secs" --budget "$budget" \
        --dir "$WORK/$p" $KEEP
    KEEP=--keep
done
echo "== gpu_check: $(( $(date +%s) - start_all )) s in all =="
"$PY" "$TABLE" print --table "$OUT/table.json" --order "$(IFS=,; echo "${PHASES[*]}")" --markdown "$OUT/table.md"
