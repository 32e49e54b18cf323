#!/usr/bin/env bash
# GPU numbers of lmeec-jax, one script (also runs on a CPU with a small override):
#
#   benchmarks/bench_gpu.sh                      # b+ at 480: predict bf16 + f32, memory per object, train
#   CONFIG=lmeec_hiera_nano TAKES=1 FRAMES=4 TRAIN_MODELS=nano TRAIN_STEPS=1 benchmarks/bench_gpu.sh  # quick check
#
# Prints
#   * frames/s of `eval predict` (Predictor.predict_split, the code behind the CLI) on a synthetic
#     split, bfloat16 and float32, after a warm-up pass that compiles every shape (compile excluded;
#     video-frames = (video, frame) steps, skipped frames included);
#   * peak device memory (XLA allocator's peak_bytes_in_use) of a run with one object per batch and
#     of one with up to MAX_OBJECTS, and the memory per object (the difference over the extra objects);
#   * the train step's clips/s (benchmarks/bench_train.py, f32 and bf16).
# Environment overrides: CONFIG (random:<CONFIG> weights, default lmeec_hiera_b+ = 480 px), TAKES,
# FRAMES, EXO, CHUNK, MAX_OBJECTS, DTYPES ("bfloat16 float32"), TRAIN_MODELS (b+), TRAIN_STEPS (3),
# TRAIN_BATCH (1), WORK (a temporary folder, removed at the end unless KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-lmeec_hiera_b+}
TAKES=${TAKES:-2}
FRAMES=${FRAMES:-16}
EXO=${EXO:-2}
CHUNK=${CHUNK:-8}
MAX_OBJECTS=${MAX_OBJECTS:-8}
DTYPES=${DTYPES:-"bfloat16 float32"}
TRAIN_MODELS=${TRAIN_MODELS:-b+}
TRAIN_STEPS=${TRAIN_STEPS:-3}
TRAIN_BATCH=${TRAIN_BATCH:-1}
WORK=${WORK:-$(mktemp -d /tmp/bench_gpu.XXXXXX)}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # peak_bytes_in_use = what the run needs, not the pool
mkdir -p "$WORK"
trap '[ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"' EXIT

python -c "import jax; d = jax.devices()[0]; print(f'backend {jax.default_backend()}: {d.device_kind}, jax {jax.__version__}')"
python -m eval make-synthetic --out "$WORK/split" --takes "$TAKES" --frames "$FRAMES" --exo-cams "$EXO" --seed 7 \
    --workers 2 > "$WORK/make.log"
echo "split: $TAKES takes x $FRAMES frames, aria + $EXO exo cameras; model $CONFIG (random weights), chunk $CHUNK"

predict() {  # predict DTYPE MAX_OBJECTS -> one line: dtype objects frames seconds fps peak_bytes
python - "$WORK" "$CONFIG" "$1" "$CHUNK" "$2" <<'EOF'
import sys, time, shutil
import jax
from lmeec_jax import Predictor
work, config, dtype, chunk, max_objects = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
pr = Predictor.load(f"random:{config}", dtype=dtype, chunk=chunk, max_objects=max_objects)
out = f"{work}/out_{dtype}_{max_objects}"
pr.predict_split(f"{work}/split", "both", out + "_warm", progress=False, log=lambda s: None)  # compiles
shutil.rmtree(out, ignore_errors=True)
t = time.perf_counter()
s = pr.predict_split(f"{work}/split", "both", out, progress=False, log=lambda s: None)
jax.effects_barrier()
dt = time.perf_counter() - t
frames = sum(x.frames for x in s.summaries.values())
stats = jax.devices()[0].memory_stats() or {}
peak = stats.get("peak_bytes_in_use", -1)
batch = max(b for _, b in pr.runner.compiled)
print(dtype, batch, frames, f"{dt:.3f}", f"{frames / dt:.3f}", peak, flush=True)
EOF
}

declare -A PEAK1 PEAKB BATCH
for DT in $DTYPES; do
  read -r dt b fr sec fps peak < <(predict "$DT" "$MAX_OBJECTS" | tail -n 1)
  echo "eval predict --direction both, $DT: $fr video-frames in $sec s = $fps video-frames/s (batches up to $b objects)"
  PEAKB[$DT]=$peak; BATCH[$DT]=$b
  read -r _ _ _ _ _ peak1 < <(predict "$DT" 1 | tail -n 1)
  PEAK1[$DT]=$peak1
done
for DT in $DTYPES; do
  python - "$DT" "${PEAK1[$DT]}" "${PEAKB[$DT]}" "${BATCH[$DT]}" <<'EOF'
import sys
dt, p1, pb, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if p1 < 0 or pb < 0:
    print(f"peak device memory, {dt}: not reported by this backend (memory_stats)")
else:
    per = (pb - p1) / max(b - 1, 1)
    print(f"peak device memory, {dt}: {p1 / 2**20:.0f} MiB with 1 object per batch, {pb / 2**20:.0f} MiB with up to "
          f"{b}: {per / 2**20:.1f} MiB per extra object")
EOF
done
for DT in float32 bfloat16; do
  python benchmarks/bench_train.py --models "$TRAIN_MODELS" --batch "$TRAIN_BATCH" --steps "$TRAIN_STEPS" --dtype "$DT" \
      | grep -v '^backend' | sed "s/^/train step: /"
done
