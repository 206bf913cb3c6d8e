#!/usr/bin/env bash
# Launch a robust-admm run. Local runs now; multi-host (TPU pods, Slurm) come later.
#   launch.sh local --config configs/mnist.py:cpu [--workdir runs/mnist] [-- --config.admm.rho=0.01 ...]
#   launch.sh --help
set -euo pipefail

usage() {
  sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'
}

mode="${1:-}"
case "$mode" in
  -h|--help|"") usage; exit 0 ;;
  local) shift ;;
  tpu|slurm) echo "launch.sh: mode '$mode' is not implemented yet (multi-host launch is a later issue)" >&2; exit 2 ;;
  *) echo "launch.sh: unknown mode '$mode'; allowed: local" >&2; usage >&2; exit 2 ;;
esac

config="" workdir="runs/$(date +%Y%m%d-%H%M%S)" dry_run=0 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "launch.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
[ -n "$config" ] || { echo "launch.sh: --config is required" >&2; exit 2; }

cmd=(python -m robust_admm.train --config "$config" --workdir "$workdir" "${extra[@]}")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
