#!/usr/bin/env bash
# One command for a 2-GPU machine (2 x H200): the training experiment with both encoder variants
# and the mismatched-context control, then the main stage's scaling on 1 and 2 GPUs.
#
#   scripts/gpu_issue4.sh OUTDIR DECODER DATA_DIR SOURCES
#
#   OUTDIR    logs (*.log), results/ (training.md/json, training_scaling.md/json) and small run
#             files (runs/: steps.tsv, validation.tsv, metrics.json, scale.json, per_window_nll.json)
#   DECODER   save_pretrained directory of the decoder + tokenizer (`cepe convert-decoder` writes one)
#   DATA_DIR  folder of *.jsonl.gz ({id, text} per line)
#   SOURCES   comma-separated file stems in DATA_DIR, e.g. austen,kjv,abs-guide
#
# Run from the repository root; needs torch, transformers, accelerate, pyarrow (PYTHONPATH=., no
# install). Steps, in order:
#   (a) `--mode run --encoders decoder-layers,mlm` on GPU 0, BUDGET_S seconds of training shared by
#       the two variants (run_variant: decoder-layers 25% warm-up / 75% train; mlm 25% encoder
#       pretraining / 20% warm-up / 55% train; each stage adds an 8-step timing probe);
#   (b) `--mode scale` for SCALE_STEPS steps with 1 process (GPU 0), then 2 processes through
#       `accelerate launch --multi_gpu` (GPUs 0,1), reusing (a)'s windows. (b) starts after (a) has
#       finished and written training.md/json; (b) writes only training_scaling.md/json (and the
#       scaling section of training.md), so its failure or timeout cannot lose (a)'s results. Each
#       scale run gets at most what is left of DEADLINE_S (steps cut down to fit, or skipped).
# Exit status: that of (a). Timings: OUTDIR/timings.txt (and on stdout).
# Environment overrides: PY (python3), WORK (checkpoints/shards, default /tmp/gpu_issue4: kept out
# of OUTDIR), BUDGET_S (270), SCALE_STEPS (200), DEADLINE_S (540: the whole script's limit),
# SCALE_STEP_S (0.25: assumed seconds a scale step, to cut SCALE_STEPS), SCALE_OVERHEAD_S (45),
# EXTRA_ARGS (more gpu_training.py options for both modes, e.g. a small geometry for a CPU dry run),
# SKIP_RUN=1 (skip (a): only the scale runs, reusing WORK's windows from an earlier (a)).
set -u -o pipefail

if [ $# -ne 4 ]; then
    echo "usage: $0 OUTDIR DECODER DATA_DIR SOURCES" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd) DECODER=$2 DATA_DIR=$3 SOURCES=$4
PY=${PY:-python3}
WORK=${WORK:-/tmp/gpu_issue4}
BUDGET_S=${BUDGET_S:-270}
SCALE_STEPS=${SCALE_STEPS:-200}
DEADLINE_S=${DEADLINE_S:-540}
SCALE_STEP_S=${SCALE_STEP_S:-0.25}
SCALE_OVERHEAD_S=${SCALE_OVERHEAD_S:-45}
RESULTS=$OUTDIR/results
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

# NVLink multicast stays off (the machine's rule; also for processes accelerate starts).
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

mkdir -p "$OUTDIR" "$RESULTS" "$WORK"
# what an earlier use of WORK left (this script's own outputs only) would mix in: scaling rows, the
# scale runs' initial model, stage outputs; SKIP_RUN keeps (a)'s windows for the scale runs
rm -rf "$WORK/scale.json" "$WORK/scale"
[ "${SKIP_RUN:-0}" = 1 ] || rm -rf "$WORK/shards" "$WORK/decoder-layers" "$WORK/mlm" "$WORK/per_window_nll.json"
START=$SECONDS
TIMES=$OUTDIR/timings.txt
: > "$TIMES"
stamp() { echo "[$(date +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$TIMES"; }

copy_runs() {  # small per-run files into OUTDIR (checkpoints stay in WORK)
    (cd "$WORK" && find . \( -name steps.tsv -o -name validation.tsv -o -name metrics.json -o -name scale.json \
        -o -name per_window_nll.json -o -name config.yaml \) -not -path "*/checkpoints/*" -not -path "*-probe/*" \
        -print0 2>/dev/null | while IFS= read -r -d '' f; do
            mkdir -p "$OUTDIR/runs/$(dirname "$f")" && cp "$f" "$OUTDIR/runs/$f"; done)
}
trap copy_runs EXIT

stamp "start: $(getconf _NPROCESSORS_ONLN) cores; $("$PY" -c 'import torch, transformers, accelerate; print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__, "gpus", torch.cuda.device_count())' 2>&1)"
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader 2>&1 | tee -a "$TIMES"

# (a) the experiment: both encoders, the three-way comparison and the control, on GPU 0
RC_A=0
if [ "${SKIP_RUN:-0}" != 1 ]; then
    stamp "(a) run mode: --encoders decoder-layers,mlm --budget-s $BUDGET_S"
    CUDA_VISIBLE_DEVICES=0 "$PY" scripts/gpu_training.py --mode run --decoder "$DECODER" --data-dir "$DATA_DIR" \
        --sources "$SOURCES" --encoders decoder-layers,mlm --budget-s "$BUDGET_S" --out "$WORK" --results "$RESULTS" \
        --no-progress ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$OUTDIR/run.log"
    RC_A=$?
    stamp "(a) finished: exit $RC_A"
    copy_runs
fi

# (b) scaling: the main stage for SCALE_STEPS steps on 1, then 2 GPUs (each bounded by what is left)
scale_run() {  # $1 = processes, $2 = CUDA_VISIBLE_DEVICES; the rest = the launcher
    local n=$1 devices=$2; shift 2
    local left=$((DEADLINE_S - (SECONDS - START)))
    local share=$left
    [ "$n" = 1 ] && share=$((left / 2))  # leave the 2-process run its half
    local steps MIN_STEPS=$((SCALE_STEPS < 20 ? SCALE_STEPS : 20))
    steps=$("$PY" -c "import sys; s, o, t, w = map(float, sys.argv[1:]); print(int(min(s, max(0, (w - o) / t))))" \
        "$SCALE_STEPS" "$SCALE_OVERHEAD_S" "$SCALE_STEP_S" "$share")
    if [ "$steps" -lt "$MIN_STEPS" ]; then
        stamp "(b) skipping the $n-process scale run: ${left}s left of DEADLINE_S=$DEADLINE_S"
        return 0
    fi
    local limit=$((share - 5 > 1 ? share - 5 : 1))
    stamp "(b) scale mode, $n process(es) on GPU(s) $devices: $steps steps, timeout ${limit}s"
    env CUDA_VISIBLE_DEVICES="$devices" timeout --signal=TERM --kill-after=15 "$limit" "$@" scripts/gpu_training.py \
        --mode scale --decoder "$DECODER" --data-dir "$DATA_DIR" --sources "$SOURCES" --scale-steps "$steps" \
        --out "$WORK" --results "$RESULTS" --no-progress ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$OUTDIR/scale-$n.log"
    local rc=$?
    stamp "(b) $n-process scale run finished: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)')"
    return 0
}
[ -f "$RESULTS/training.json" ] || stamp "(a) wrote no training.json; the scale runs follow anyway"
scale_run 1 0 "$PY"
scale_run 2 0,1 "$PY" -m accelerate.commands.launch --num_processes 2 --multi_gpu --num_machines 1 \
    --mixed_precision bf16 --dynamo_backend no

stamp "done: (a) exit $RC_A; results in $RESULTS: $(ls "$RESULTS" | tr '\n' ' ')"
exit "$RC_A"
