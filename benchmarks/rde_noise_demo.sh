#!/usr/bin/env bash
# The synthetic noisy-correspondence experiment of README "Noisy correspondences: RDE": for each seed of SEEDS
# (default "1 2"), the demo recipe clean, the demo recipe at 50 % noise, and the RDE demo recipe at 50 % noise, all
# started at once in the background (nice, one thread each); each training is followed by test.py on best.pth and
# last.pth; at the end, tools.summarize per setting.   EPOCHS (default 6) shortens the recipes (the demo's is 16).
#   bash benchmarks/rde_noise_demo.sh [LOGS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
LOGS="${1:-logs_rde_noise}"
EPOCHS="${EPOCHS:-6}"
PY="${PYTHON:-python}"
read -r -a SEED_LIST <<< "${SEEDS:-1 2}"
mkdir -p "$LOGS"
one() {  # one NAME SEED train.py-options...: train, then test best.pth and last.pth
    local name=$1 seed=$2; shift 2
    local log="$LOGS/$name.seed$seed.log"
    OMP_NUM_THREADS=1 nice "$PY" train.py "$@" --seed "$seed" --num_epoch "$EPOCHS" --num_workers 0 \
        --output_dir "$LOGS/$name" > "$log" 2>&1
    local out
    out=$(sed -n 's/.*run dir \(.*\)$/\1/p' "$log" | head -n 1)
    for ckpt in best.pth last.pth; do
        OMP_NUM_THREADS=1 nice "$PY" test.py --config_file "$out/configs.yaml" --checkpoint "$out/$ckpt" \
            --num_workers 0 >> "$log" 2>&1
    done
}
for seed in "${SEED_LIST[@]}"; do
    one irra_clean "$seed" --config configs/demo.yaml &
    one irra_noisy50 "$seed" --config configs/demo.yaml --noisy_rate 0.5 &
    one rde_noisy50 "$seed" --config configs/rde_demo.yaml --noisy_rate 0.5 &
done
wait
for name in irra_clean irra_noisy50 rde_noisy50; do
    echo "== $name"
    "$PY" -m tools.summarize "$LOGS/$name"/SynthPEDES/*
done
