#!/usr/bin/env bash
# IRRA paper recipe.   bash run_irra.sh [demo | CUHK-PEDES | ICFG-PEDES | RSTPReid] [extra train.py options]
# RDE's recipe:        [NOISY_RATE=0.5] bash run_irra.sh rde [CUHK-PEDES | ICFG-PEDES | RSTPReid]   |   bash run_irra.sh rde_demo
# A method's demo:     bash run_irra.sh <method>_demo      (configs/<method>_demo.yaml: rde_demo, clip_itc_demo, ...)
#   demo         : SynthPEDES (generated on first use) + a from-scratch tiny CLIP, CPU, a few minutes.
#   a dataset    : the paper's recipe with OpenAI ViT-B/16 weights; the dataset under --root_dir (default ./data).
# The dataset may also come from the DATASET_NAME environment variable, as in the original script.
# Multi-GPU:  NPROC=4 bash run_irra.sh CUHK-PEDES   (uses torchrun; the batch is split over the processes)
# Seeds:      SEEDS="1 2 3" bash run_irra.sh RSTPReid   (one training per seed, each followed by test.py on best.pth
#             and last.pth, then the table of tools/summarize.py over these runs: per run and mean ± std)
set -euo pipefail
cd "$(dirname "$0")"
DATASET_NAME="${1:-${DATASET_NAME:-CUHK-PEDES}}"
[ $# -gt 0 ] && shift
PY="${PYTHON:-python}"
read -r -a SEED_LIST <<< "${SEEDS:-}"
for s in ${SEED_LIST[@]+"${SEED_LIST[@]}"}; do
    [[ "$s" =~ ^-?[0-9]+$ ]] || {
        echo "run_irra.sh: SEEDS='$SEEDS': '$s' is not an integer (expected e.g. SEEDS=\"1 2 3\")" >&2; exit 2; }
done

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
RUNS=()
# train_and_test TRAIN_COMMAND...: run a training (its output shown), find its run directory in the log, then
# evaluate best.pth and last.pth with test.py (each records its results in the run's test_metrics.json).
train_and_test() {
    "$@" | tee "$LOG"
    local out
    out=$(sed -n 's/.*run dir \(.*\)$/\1/p' "$LOG" | head -n 1)
    [ -n "$out" ] || { echo "run_irra.sh: could not find the run directory in the training log" >&2; exit 1; }
    for ckpt in best.pth last.pth; do
        if [ -f "$out/$ckpt" ]; then
            "$PY" test.py --config_file "$out/configs.yaml" --checkpoint "$out/$ckpt"
        else
            echo "run_irra.sh: $out/$ckpt does not exist: not tested" >&2
        fi
    done
    RUNS+=("$out")
}

# RDE (README "Noisy correspondences: RDE"):  [NOISY_RATE=0.5] bash run_irra.sh rde CUHK-PEDES   |   bash run_irra.sh rde_demo
RDE=()
if [ "$DATASET_NAME" = "rde" ]; then
    DATASET_NAME="${1:-CUHK-PEDES}"
    [ $# -gt 0 ] && shift
    RATE="${NOISY_RATE:-0.0}"
    # RDE's run_rde.sh; the GMM setting as RDE's code picks it (it reads the true noise rate: see the README)
    GMM=$(awk -v r="$RATE" -v d="$DATASET_NAME" 'BEGIN { print ((r > 0.4 || d == "RSTPReid") ? "precise" : "fast") }')
    RDE=(--name rde --noisy_rate "$RATE" --noisy_file "./noiseindex/${DATASET_NAME}_${RATE}.npy" --gmm_setting "$GMM")
fi
DEMO_CFG=configs/demo.yaml
# a method's demo: <method>_demo runs configs/<method>_demo.yaml (rde_demo, clip_itc_demo, ...)
if [[ "$DATASET_NAME" == *_demo ]] && [ -f "configs/$DATASET_NAME.yaml" ]; then
    DEMO_CFG="configs/$DATASET_NAME.yaml"
    DATASET_NAME=demo
fi

if [ "$DATASET_NAME" = "demo" ]; then
    # configs/demo.yaml holds the demo's options; train, evaluate best.pth and last.pth, and show what the run is worth.
    if [ ${#SEED_LIST[@]} -eq 0 ]; then
        train_and_test "$PY" train.py --config "$DEMO_CFG" "$@"
    fi
    for seed in ${SEED_LIST[@]+"${SEED_LIST[@]}"}; do
        train_and_test "$PY" train.py --config "$DEMO_CFG" "$@" --seed "$seed"
    done
    for out in "${RUNS[@]}"; do
        echo "Run directory: $out"
    done
    echo "Next: python visualize.py --config_file ${RUNS[0]}/configs.yaml"
    "$PY" -m tools.summarize "${RUNS[@]}"
    exit 0
fi

case "$DATASET_NAME" in
    CUHK-PEDES) CFG=configs/cuhk_pedes.yaml ;;
    ICFG-PEDES) CFG=configs/icfg_pedes.yaml ;;
    RSTPReid)   CFG=configs/rstpreid.yaml ;;
    *) echo "run_irra.sh: unknown dataset '$DATASET_NAME'; valid: demo CUHK-PEDES ICFG-PEDES RSTPReid (or rde <dataset>, <method>_demo: $(cd configs && ls *_demo.yaml | sed 's/.yaml//' | tr '\n' ' '))" >&2; exit 2 ;;
esac

if [ "${NPROC:-1}" -gt 1 ]; then
    LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC")
else
    LAUNCH=("$PY")
fi
# The paper recipe (as the original run_irra.sh), spelled out; the config file adds nothing else.
if [ ${#RDE[@]} -gt 0 ]; then  # RDE's run_rde.sh, spelled out likewise (configs/rde_<dataset>.yaml)
    RECIPE=("${LAUNCH[@]}" train.py --config "${CFG/configs\//configs/rde_}" "${RDE[@]}" --img_aug --txt_aug
        --batch_size 64 --select_ratio 0.3 --tau 0.015 --margin 0.1 --loss_names tal
        --dataset_name "$DATASET_NAME" --num_epoch 60 "$@")
else
RECIPE=("${LAUNCH[@]}" train.py --config "$CFG"
    --name irra
    --img_aug
    --batch_size 64
    --MLM
    --loss_names 'sdm+mlm+id'
    --dataset_name "$DATASET_NAME"
    --num_epoch 60
    "$@")
fi
if [ ${#SEED_LIST[@]} -eq 0 ]; then
    "${RECIPE[@]}"
    exit 0
fi
for seed in "${SEED_LIST[@]}"; do
    train_and_test "${RECIPE[@]}" --seed "$seed"
done
"$PY" -m tools.summarize "${RUNS[@]}"
