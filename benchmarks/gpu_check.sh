#!/usr/bin/env bash
# The project's speeds on one GPU, in one table, within 8 minutes.
#
# Usage (from anywhere; the checkout this script is in is the code that runs):
#   benchmarks/gpu_check.sh --out DIR [--python PY] [gpu_check.py options]
#   benchmarks/gpu_check.sh --out DIR --shrink     # or GPU_CHECK_SHRINK=1: tiny, for a CPU
# Prints a device line and one table, and writes DIR/gpu_check.json and DIR/gpu_check.md
# (rewritten after each row). Rows: (a) ResNet-50, 224 px, 1000 classes, natural training
# in bfloat16 from an on-device random split, the streamed reader alone and training
# through it from generated JPEGs (img/s, input wait share); (b) PGD-10 training of VGG-16,
# ResNet-18, WRN-34-10 at 32 px in float32 and bfloat16; (c) AutoAttack standard on 1,000
# images (ResNet-18, random weights). Options of benchmarks/gpu_check.py pass through
# (--reader-threads, --reader-workers, --budget-s, --timed-s; see its --help). JAX's GPU
# memory settings are left at their defaults (it preallocates 75% of the GPU).
# Exit status: 0 all rows ran or were skipped for time, 1 a row failed (its status says
# why), 2 bad arguments or no GPU without --shrink, 124 stopped at the 8-minute limit.
#
# Expected time per section on one recent GPU (estimates: no GPU has run this yet; most of
# each row is compilation), against the caps that keep the whole under 8 minutes:
#   start, JAX and the device line                     ~10 s
#   a1 ResNet-50 bf16 b256, device feed                ~60 s  (needs 45 s left to start)
#   a2 640 JPEGs 500x375 written, the reader alone     ~10 s  (15 s)
#   a3 ResNet-50 bf16 b256, streamed feed              ~60 s  (45 s)
#   b1-b6 PGD-10 b128, 3 models x 2 dtypes             ~40 s each, ~240 s  (25 s each)
#   c1 AutoAttack, 1,000 images                        ~30-90 s  (60 s)
# A row starts only if the Python side's budget (440 s) has its need left, else it is
# marked skipped; timed repeats stop after 15 s a row; this wrapper stops everything at
# 480 s (GPU_CHECK_LIMIT_S) and then prints the rows finished. --shrink runs every section
# at CPU sizes (small models, batch 4, a few steps, 8 images) in about a minute on 2 cores.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python}"
limit="${GPU_CHECK_LIMIT_S:-480}"
out=""
args=()

die() {
  echo "gpu_check.sh: $*" >&2
  exit 2
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
      exit 0 ;;
    --python)
      [[ $# -ge 2 ]] || die "--python needs a value"
      python="$2"; shift 2 ;;
    --out)
      [[ $# -ge 2 ]] || die "--out needs a value"
      out="$2"; args+=("--out" "$2"); shift 2 ;;
    --out=*)
      out="${1#--out=}"; args+=("$1"); shift ;;
    *)
      args+=("$1"); shift ;;
  esac
done
[[ -n "$out" ]] || die "--out DIR is required (where gpu_check.json and gpu_check.md go)"
[[ "$limit" =~ ^[0-9]+$ ]] || die "GPU_CHECK_LIMIT_S=$limit must be a whole number of seconds"

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
rc=0
timeout -k 10 "$limit" "$python" "$here/gpu_check.py" "${args[@]}" || rc=$?
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
  echo "gpu_check.sh: stopped at the ${limit} s limit; the rows finished:" >&2
  if [[ -f "$out/gpu_check.md" ]]; then
    cat "$out/gpu_check.md"
  else
    echo "(none: $out/gpu_check.md was not written)"
  fi
  exit 124
fi
exit "$rc"
