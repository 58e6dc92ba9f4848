#!/usr/bin/env bash
# IRRA paper recipe.   bash run_irra.sh [demo | CUHK-PEDES | ICFG-PEDES | RSTPReid] [extra train.py options]
#   demo         : SynthPEDES (generated on first use) + a from-scratch tiny CLIP, CPU, a few minutes.
#   a dataset    : the paper's recipe with OpenAI ViT-B/16 weights; the dataset under --root_dir (default ./data).
# The dataset may also come from the DATASET_NAME environment variable, as in the original script.
# Multi-GPU:  NPROC=4 bash run_irra.sh CUHK-PEDES   (uses torchrun; the batch is split over the processes)
set -euo pipefail
cd "$(dirname "$0")"
DATASET_NAME="${1:-${DATASET_NAME:-CUHK-PEDES}}"
[ $# -gt 0 ] && shift
PY="${PYTHON:-python}"

if [ "$DATASET_NAME" = "demo" ]; then
    # configs/demo.yaml holds the demo's options; train, then evaluate the best checkpoint with test.py.
    LOG=$(mktemp)
    trap 'rm -f "$LOG"' EXIT
    "$PY" train.py --config configs/demo.yaml "$@" | tee "$LOG"
    OUT=$(sed -n 's/.*run dir \(.*\)$/\1/p' "$LOG" | head -n 1)
    [ -n "$OUT" ] || { echo "run_irra.sh: could not find the run directory in the training log" >&2; exit 1; }
    "$PY" test.py --config_file "$OUT/configs.yaml"
    echo "Run directory: $OUT"
    echo "Next: python visualize.py --config_file $OUT/configs.yaml"
    exit 0
fi

case "$DATASET_NAME" in
    CUHK-PEDES) CFG=configs/cuhk_pedes.yaml ;;
    ICFG-PEDES) CFG=configs/icfg_pedes.yaml ;;
    RSTPReid)   CFG=configs/rstpreid.yaml ;;
    *) echo "run_irra.sh: unknown dataset '$DATASET_NAME'; valid: demo CUHK-PEDES ICFG-PEDES RSTPReid" >&2; exit 2 ;;
esac

if [ "${NPROC:-1}" -gt 1 ]; then
    LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC")
else
    LAUNCH=("$PY")
fi
# The paper recipe (as the original run_irra.sh), spelled out; the config file adds nothing else.
"${LAUNCH[@]}" train.py --config "$CFG" \
    --name irra \
    --img_aug \
    --batch_size 64 \
    --MLM \
    --loss_names 'sdm+mlm+id' \
    --dataset_name "$DATASET_NAME" \
    --num_epoch 60 \
    "$@"
