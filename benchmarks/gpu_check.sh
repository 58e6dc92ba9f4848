#!/usr/bin/env bash
# One prepared check of the accelerator paths, for a machine with a GPU:
# 1. fp16 weights (--precision auto on a GPU = the original's convert_weights), AMP bf16/fp16 (+GradScaler) and fp32
#    each train 2 demo epochs on a small generated dataset (epoch speed, metrics);
# 2. the full-size model (ViT-B/16 shapes, 384x128, sdm+mlm+id, cmt_depth 4) at FULL_BS (64) per precision: the
#    original computation vs ours vs ours + --grad_checkpointing, samples/s and max memory allocated
#    (benchmarks/bench_train_variants.py; JSON files in $RESULTS);
# 3. evaluation encoding, images/s and texts/s, ours vs the original computation (benchmarks/bench_encode.py), and the
#    train loader's throughput with real decoding at bs 64 (benchmarks/bench_dataloader.py --native);
# 4. with 2+ GPUs: NCCL DDP against one process (benchmarks/compare_runs.py: the same last.pth and metrics).
#   bash benchmarks/gpu_check.sh            # DEVICE=cpu SKIP_FULL=1 bash benchmarks/gpu_check.sh: the plumbing on a CPU
# Issue 17's figures in one run (samples/s ours vs original, max memory, device busy fraction, MFU, evaluation and
# loader throughput; ~10 min is a guess, not yet measured):
#   PRECISIONS="fp16 amp_bf16" OPT_PRECISIONS=fp16 PROFILE=12 SKIP_DEMO=1 bash benchmarks/gpu_check.sh
# Environment: FULL_BS (64), PRECISIONS, FULL_TIMEOUT (s per benchmark), PROFILE=N (profile one step of each variant
# in PROFILE_PRECISIONS, "fp16 amp_bf16": the N costliest operators and the device's busy time), PEAK_TFLOPS /
# PEAK_TFLOPS_FP32 (the GPU's dense 16-bit / fp32 peak for MFU; H100/H200 known), OPT_PRECISIONS (fp16 amp_bf16: also
# ours with per-parameter optimizer groups, fused Adam, unfused attention, length buckets of 8), SKIP_FULL, SKIP_DEMO,
# SKIP_EVAL, SKIP_LOADER, WORK, RESULTS, FORCE_DDP=1 NPROC=2 (the DDP comparison without 2 GPUs, e.g. gloo on the CPU).
# On a machine without internet whose python lacks ftfy / prettytable, bring them as wheels:
#   pip download --no-deps -d .gpuwheels ftfy prettytable wcwidth   (then, there:)
#   python3 -m pip install --no-index --no-deps .gpuwheels/*.whl && PYTHON=python3 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
DEVICE="${DEVICE:-cuda}"
WORK="${WORK:-$(mktemp -d)}"
RESULTS="${RESULTS:-$WORK/results}"
FULL_BS="${FULL_BS:-64}"
PRECISIONS="${PRECISIONS:-fp16 amp_bf16 amp_fp16 fp32}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
"$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "| cuda available:", torch.cuda.is_available(),
      "| devices:", torch.cuda.device_count(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
# the GPU's peak TFLOP/s for MFU (dense; override with PEAK_TFLOPS / PEAK_TFLOPS_FP32), 0 = unknown (no MFU)
read -r PEAK16 PEAK32 < <("$PY" - <<'PYEOF'
import torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
print(*next((v for k, v in {"H200": (989, 67), "H100": (989, 67)}.items() if k in name), (0, 0)))
PYEOF
)
PEAK16="${PEAK_TFLOPS:-$PEAK16}"
PEAK32="${PEAK_TFLOPS_FP32:-$PEAK32}"
# settings measured besides the default (ours only): the original's per-parameter groups, fused Adam, the attention
# of nn.MultiheadAttention (what fused attention brings), and length buckets of 8 (static shapes)
OPT_VARIANTS=("--param_groups per_parameter" "--fused_optimizer" "--no-fused_attention" "--length_bucket 8")
if [ -z "${SKIP_FULL:-}" ]; then
    for p in $PRECISIONS; do
        echo "== full size, bs $FULL_BS, $p: original vs ours vs ours + grad checkpointing"
        PROF=()
        case " ${PROFILE_PRECISIONS:-fp16 amp_bf16} " in *" $p "*)
            if [ "${PROFILE:-0}" -gt 0 ]; then PROF=(--profile "$PROFILE"); fi;;
        esac
        PEAK="$PEAK16"; if [ "$p" = fp32 ]; then PEAK="$PEAK32"; fi
        timeout "${FULL_TIMEOUT:-120}" "$PY" -m benchmarks.bench_train_variants --device "$DEVICE" --precision "$p" --batch_size "$FULL_BS" \
            --warmup 2 --runs 5 --peak_tflops "$PEAK" --json "$RESULTS/full_$p.json" "${PROF[@]}" || echo "FAILED: full size $p"
        case " ${OPT_PRECISIONS:-fp16 amp_bf16} " in *" $p "*)
            for i in "${!OPT_VARIANTS[@]}"; do
                echo "== full size, bs $FULL_BS, $p: ours ${OPT_VARIANTS[$i]}"
                # shellcheck disable=SC2086  # the option list splits on purpose
                timeout "${FULL_TIMEOUT:-120}" "$PY" -m benchmarks.bench_train_variants --device "$DEVICE" --precision "$p" \
                    --batch_size "$FULL_BS" --warmup 2 --runs 5 --peak_tflops "$PEAK" --variants ours ${OPT_VARIANTS[$i]} \
                    --json "$RESULTS/full_${p}_opt$i.json" || echo "FAILED: full size $p ${OPT_VARIANTS[$i]}"
            done;;
        esac
    done
fi
if [ -z "${SKIP_EVAL:-}" ]; then
    for p in $PRECISIONS; do
        echo "== evaluation encoding, full size, $p: images/s and texts/s, ours vs original (test batch 512)"
        timeout "${FULL_TIMEOUT:-120}" "$PY" -m benchmarks.bench_encode --device "$DEVICE" --precision "$p" \
            --batch_size 512 --images "${EVAL_N:-6144}" --texts "${EVAL_N:-6144}" || echo "FAILED: encoding $p"
    done
fi
if [ -z "${SKIP_LOADER:-}" ]; then
    echo "== train loader, bs 64, 384x128 PNGs decoded (SynthPEDES --native), MLM on: samples/s over an epoch, by workers"
    timeout "${LOADER_TIMEOUT:-600}" "$PY" -m benchmarks.bench_dataloader --native --batch_size 64 --batches 0 \
        --repeats 2 --workers ${LOADER_WORKERS:-0 4 8 16} || echo "FAILED: loader"
fi
COMMON=(--config configs/demo.yaml --root_dir "$WORK/data" --output_dir "$WORK/logs" --device "$DEVICE"
        --num_epoch 2 --num_workers 4 --log_period 10)
if [ -n "${SKIP_DEMO:-}" ]; then echo "SKIP_DEMO set: no demo epochs per precision"; else
echo "== fp16 weights (the original's precision on CUDA), Adam eps 1e-3 as the paper recipe"
"$PY" train.py "${COMMON[@]}" --name fp16 --precision auto --optimizer Adam --lr 1e-4 --lr_factor 5
echo "== AMP bf16"
"$PY" train.py "${COMMON[@]}" --name amp_bf16 --precision amp_bf16
echo "== AMP fp16 (GradScaler)"
"$PY" train.py "${COMMON[@]}" --name amp_fp16 --precision amp_fp16
echo "== fp32, fused AdamW (the demo's settings): epoch time"
"$PY" train.py "${COMMON[@]}" --name fp32 --precision fp32
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$DEVICE" != "cpu" ] && [ "$NGPU" -ge 2 ] || [ -n "${FORCE_DDP:-}" ]; then
    # the same fp32 run (identity sampler: the global batches are the same) with torchrun on every GPU and in one
    # process; benchmarks/compare_runs.py compares last.pth and metrics.jsonl (TF32 convolutions and another
    # reduction order over ranks make float noise, hence --atol 1e-3)
    NPROC="${NPROC:-$NGPU}"
    DDP=(--sampler identity --num_instance 4 --precision fp32)
    echo "== DDP over $NPROC processes vs one process, identity sampler, fp32"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" train.py "${COMMON[@]}" --name ddp "${DDP[@]}"
    "$PY" train.py "${COMMON[@]}" --name one_process "${DDP[@]}"
    "$PY" -m benchmarks.compare_runs "$WORK"/logs/SynthPEDES/*_ddp "$WORK"/logs/SynthPEDES/*_one_process \
        --atol "${DDP_ATOL:-1e-3}" --metric_atol "${DDP_METRIC_ATOL:-0.5}" || echo "FAILED: DDP differs from one process"
fi
for f in "$WORK"/logs/SynthPEDES/*/metrics.jsonl; do [ -e "$f" ] && echo "$f: $(tail -n 1 "$f")"; done
grep -h "Epoch 2 done" "$WORK"/logs/SynthPEDES/*/train_log.txt || true
