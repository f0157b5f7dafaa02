#!/usr/bin/env bash
# The whole job, end to end.
#
#   bash run.sh            embedded digits DiT (CPU, ~5 min): quantize W2 with VQ4DiT and with k-means only,
#                          sample FP and both W2 models from the same seeds, evaluate, compare side by side
#   CKPT=DiT-XL-2-256x256.pt bash run.sh xl
#                          the paper's DiT-XL/2 run on a GPU. Variables: RES=256|512, BITS=2|3,
#                          STEPS=50|100|250, NUM_SAMPLES=10000, GPUS=1, REF_BATCH=ADM reference .npz (for FID)
set -euo pipefail
cd "$(dirname "$0")"

# install what is missing (nothing when the environment is ready)
python -c "import torch, diffusers, safetensors, sklearn, scipy, yaml, tqdm, PIL, matplotlib" 2>/dev/null \
  || pip install -r requirements.txt

MODE=${1:-digits}
OUT=${OUT:-outputs/run}
SEED=${SEED:-0}

if [ "$MODE" = digits ]; then
  N=${NUM_SAMPLES:-200}
  # --skip-existing: a rerun keeps an artifact or samples this same run made (settings and input files unchanged)
  python quantize.py --config digits_w2 --seed "$SEED" --out "$OUT/vq4dit_w2" --skip-existing
  python quantize.py --config digits_w2 --method kmeans --seed "$SEED" --out "$OUT/kmeans_w2" --skip-existing
  python sample.py --num-samples "$N" --seed "$SEED" --out "$OUT/fp" --skip-existing
  for run in kmeans_w2 vq4dit_w2; do
    python sample.py --quantized "$OUT/$run" --num-samples "$N" --seed "$SEED" --out "$OUT/$run/samples" --skip-existing
  done
  python benchmarks/compare.py --reference "$OUT/fp/samples.npz" --out "$OUT" \
    --run "k-means W2=$OUT/kmeans_w2/samples/samples.npz" --run "VQ4DiT W2=$OUT/vq4dit_w2/samples/samples.npz"
elif [ "$MODE" = xl ]; then
  : "${CKPT:?set CKPT=/path/to/DiT-XL-2-256x256.pt (or 512x512)}"
  RES=${RES:-256}; BITS=${BITS:-2}; STEPS=${STEPS:-50}; N=${NUM_SAMPLES:-10000}; GPUS=${GPUS:-1}
  Q="$OUT/xl${RES}_w${BITS}"
  python quantize.py --config "dit_xl_${RES}_w${BITS}" --ckpt "$CKPT" --seed "$SEED" --out "$Q" --skip-existing
  SAMPLE=(torchrun --nproc_per_node "$GPUS" sample.py --steps "$STEPS" --num-samples "$N" --seed "$SEED" --skip-existing)
  "${SAMPLE[@]}" --model DiT-XL/2 --ckpt "$CKPT" --image-size "$RES" --out "$OUT/xl${RES}_fp_s${STEPS}"
  "${SAMPLE[@]}" --quantized "$Q" --out "$Q/samples_s${STEPS}"
  if [ -n "${REF_BATCH:-}" ]; then
    python evaluate.py --kind imagenet --ref-batch "$REF_BATCH" --samples "$Q/samples_s${STEPS}/samples.npz" \
      --reference "$OUT/xl${RES}_fp_s${STEPS}/samples.npz" --json "$Q/eval_s${STEPS}.json"
  fi
else
  echo "usage: bash run.sh [digits|xl]" >&2
  exit 2
fi
