#!/usr/bin/env bash
# Launch a robust-admm run: on this machine, on every worker of a Cloud TPU VM (pod), or on
# a Slurm cluster. The same program runs everywhere; see `launch.sh --help`.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch.sh MODE [options] [-- extra config overrides]

Modes:
  local   run on this machine (all of its devices):
            launch.sh local --config CFG [--workdir DIR] [--python PY] [--dry-run] [-- extra]
          runs: PY -m robust_admm.train --config CFG --workdir DIR extra...
          (DIR defaults to runs/<date>-<time>, PY to python)

  tpu     run on every worker of a Cloud TPU VM or pod slice:
            launch.sh tpu --name TPU --zone ZONE [--project P] [--repo URL | --copy]
                          [--skip-setup] [--tfds-data-dir gs://...] [--python PY]
                          --config CFG --workdir DIR [--dry-run] [-- extra]
          1. puts the code in ~/robust-admm on all workers: --copy (default) copies this
             checkout with `gcloud compute tpus tpu-vm scp --recurse . TPU:~/robust-admm
             --worker=all`; --repo URL clones (or pulls) URL instead;
          2. installs it there: PY -m pip install -e . 'jax[tpu]';
          3. runs on all workers at once (gcloud compute tpus tpu-vm ssh --worker=all):
             ROBUST_ADMM_MULTIHOST=1 [TFDS_DATA_DIR=...] PY -m robust_admm.train ...
             (on TPU pods jax.distributed.initialize() auto-detects all the rest).
          --copy sends the whole folder (runs/ too): keep it small, or use --repo.
          --skip-setup skips steps 1-2. PY defaults to python3. DIR should be shared by
          all workers (a shared mount; metrics and summaries are written with plain file I/O,
          so gs:// workdirs are not supported yet): every worker writes its checkpoint part.

  slurm   run one process per node with srun (inside or outside an allocation):
            launch.sh slurm --nodes N --gpus-per-node G --config CFG --workdir DIR
                            [--partition P] [--time T] [--port PORT] [--sbatch]
                            [--python PY] [--dry-run] [-- extra]
          runs: srun --nodes N --ntasks-per-node 1 --gpus-per-node G [...] bash -c '...'
          where each task sets ROBUST_ADMM_MULTIHOST=1,
          ROBUST_ADMM_COORDINATOR=<first node of the job>:PORT (default 12355),
          ROBUST_ADMM_NUM_PROCESSES=$SLURM_NTASKS, ROBUST_ADMM_PROCESS_ID=$SLURM_PROCID
          and runs PY -m robust_admm.train ... (PY defaults to python).
          --sbatch submits the same srun line as a batch job (sbatch ... --wrap) instead.
          DIR must be on a filesystem shared by all nodes.

Common options:
  --config CFG     config file and preset, e.g. configs/mnist.py:cpu (required)
  --workdir DIR    output directory (required for tpu and slurm)
  --dry-run        print the exact commands, one per line, instead of running them
  -h, --help       this text
  -- ARGS...       passed through to robust_admm.train, e.g. -- --config.admm.rho=0.01

Errors in the arguments (unknown mode or option, missing or malformed value) exit with 2.

Example:
  launch.sh tpu --name my-v4-32 --zone us-central2-b --config configs/mnist.py \
      --workdir /mnt/shared/runs/mnist --dry-run -- --config.batch_size=1024
EOF
}

die() {
  echo "launch.sh: $*" >&2
  echo "Run 'launch.sh --help' for usage." >&2
  exit 2
}

# Quote one word for a POSIX shell: safe words as they are, others in single quotes.
q() {
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Quote and join words into one command line.
qjoin() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(q "$w")"
  done
  printf '%s' "$out"
}

is_posint() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

# ------------------------------------------------------------------------------ arguments
mode="${1:-}"
case "$mode" in
  -h|--help) usage; exit 0 ;;
  local|tpu|slurm) shift ;;
  "") usage >&2; die "missing MODE; allowed: local, tpu, slurm" ;;
  *) die "unknown mode '$mode'; allowed: local, tpu, slurm" ;;
esac

config="" workdir="" python="" dry_run=0 extra=()
tpu_name="" zone="" project="" repo="" copy=0 skip_setup=0 tfds_data_dir=""
nodes="" gpus_per_node="" partition="" time_limit="" port=12355 use_sbatch=0

# Options each mode accepts (a function, not an associative array: macOS ships bash 3.2).
allowed() {
  case "$1" in
    local) echo " --config --workdir --python --dry-run " ;;
    tpu) echo " --config --workdir --python --dry-run --name --zone --project --repo --copy --skip-setup --tfds-data-dir " ;;
    slurm) echo " --config --workdir --python --dry-run --nodes --gpus-per-node --partition --time --port --sbatch " ;;
  esac
}

while [ $# -gt 0 ]; do
  opt=$1
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    --*=*) die "write '${opt%%=*} ${opt#*=}' (a space, not '=') for option ${opt%%=*}" ;;
    --*) ;;
    *) die "unexpected argument '$opt' (config overrides go after '--')" ;;
  esac
  [[ $(allowed "$mode") == *" $opt "* ]] || {
    case "$(allowed local)$(allowed tpu)$(allowed slurm)" in
      *" $opt "*) die "option '$opt' is not valid for mode '$mode'" ;;
      *) die "unknown option '$opt' for mode '$mode'" ;;
    esac
  }
  case "$opt" in
    --dry-run) dry_run=1; shift; continue ;;
    --copy) copy=1; shift; continue ;;
    --skip-setup) skip_setup=1; shift; continue ;;
    --sbatch) use_sbatch=1; shift; continue ;;
  esac
  if [ $# -lt 2 ] || [ -z "$2" ]; then
    die "option '$opt' needs a value"
  fi
  case "$2" in
    --*) die "option '$opt' needs a value (got the option '$2')" ;;
  esac
  val=$2
  shift 2
  case "$opt" in
    --config) config=$val ;;
    --workdir) workdir=$val ;;
    --python) python=$val ;;
    --name) tpu_name=$val ;;
    --zone) zone=$val ;;
    --project) project=$val ;;
    --repo) repo=$val ;;
    --tfds-data-dir) tfds_data_dir=$val ;;
    --nodes) nodes=$val ;;
    --gpus-per-node) gpus_per_node=$val ;;
    --partition) partition=$val ;;
    --time) time_limit=$val ;;
    --port) port=$val ;;
  esac
done

missing=()
[ -n "$config" ] || missing+=(--config)
case "$mode" in
  tpu)
    [ -n "$tpu_name" ] || missing+=(--name)
    [ -n "$zone" ] || missing+=(--zone)
    [ -n "$workdir" ] || missing+=(--workdir) ;;
  slurm)
    [ -n "$nodes" ] || missing+=(--nodes)
    [ -n "$gpus_per_node" ] || missing+=(--gpus-per-node)
    [ -n "$workdir" ] || missing+=(--workdir) ;;
esac
[ ${#missing[@]} -eq 0 ] || die "mode '$mode' is missing required option(s): ${missing[*]}"

if [ "$mode" = tpu ] && [ -n "$repo" ] && [ "$copy" = 1 ]; then
  die "--repo and --copy exclude each other: clone URL on the workers, or copy this checkout"
fi
if [ "$mode" = slurm ]; then
  is_posint "$nodes" || die "--nodes '$nodes' must be a positive integer"
  is_posint "$gpus_per_node" || die "--gpus-per-node '$gpus_per_node' must be a positive integer"
  { is_posint "$port" && [ "$port" -le 65535 ]; } || die "--port '$port' must be an integer in 1..65535"
fi
[ -n "$workdir" ] || workdir="runs/$(date +%Y%m%d-%H%M%S)"
if [ -z "$python" ]; then
  if [ "$mode" = tpu ]; then python=python3; else python=python; fi
fi

# ${a[@]+"${a[@]}"}: an empty array under `set -u` in bash < 4.4.
train=("$python" -m robust_admm.train --config "$config" --workdir "$workdir" ${extra[@]+"${extra[@]}"})

# ---------------------------------------------------------------------------------- steps
steps=()  # complete shell command lines, run in order with bash -c
case "$mode" in
  local)
    steps+=("$(qjoin "${train[@]}")") ;;

  tpu)
    where=(--zone "$zone")
    [ -z "$project" ] || where+=(--project "$project")
    # Expanded by the workers' shells, not here: used unquoted in the remote commands.
    # shellcheck disable=SC2088
    remote_dir="~/robust-admm"
    if [ "$skip_setup" = 0 ]; then
      install="cd $remote_dir && $(qjoin "$python" -m pip install -e . 'jax[tpu]')"
      if [ -n "$repo" ]; then
        fetch="if [ -d $remote_dir/.git ]; then git -C $remote_dir pull --ff-only;"
        fetch+=" else git clone $(q "$repo") $remote_dir; fi"
        steps+=("$(qjoin gcloud compute tpus tpu-vm ssh "$tpu_name" "${where[@]}" \
          --worker=all --command "$fetch && $install")")
      else
        root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
        steps+=("cd $(q "$root") && $(qjoin gcloud compute tpus tpu-vm scp --recurse . \
          "$tpu_name:$remote_dir" --worker=all "${where[@]}")")
        steps+=("$(qjoin gcloud compute tpus tpu-vm ssh "$tpu_name" "${where[@]}" \
          --worker=all --command "$install")")
      fi
    fi
    envs="ROBUST_ADMM_MULTIHOST=1"
    [ -z "$tfds_data_dir" ] || envs+=" TFDS_DATA_DIR=$(q "$tfds_data_dir")"
    steps+=("$(qjoin gcloud compute tpus tpu-vm ssh "$tpu_name" "${where[@]}" \
      --worker=all --command "cd $remote_dir && $envs $(qjoin "${train[@]}")")") ;;

  slurm)
    resources=(--nodes "$nodes" --ntasks-per-node 1 --gpus-per-node "$gpus_per_node")
    [ -z "$partition" ] || resources+=(--partition "$partition")
    [ -z "$time_limit" ] || resources+=(--time "$time_limit")
    # Evaluated by each task's shell inside the job (hence the escaped \$).
    task="export ROBUST_ADMM_MULTIHOST=1"
    task+=" ROBUST_ADMM_COORDINATOR=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n1):$port\""
    task+=" ROBUST_ADMM_NUM_PROCESSES=\"\$SLURM_NTASKS\" ROBUST_ADMM_PROCESS_ID=\"\$SLURM_PROCID\""
    task+=" && exec $(qjoin "${train[@]}")"
    if [ "$use_sbatch" = 1 ]; then
      steps+=("$(qjoin sbatch "${resources[@]}" --wrap "$(qjoin srun bash -c "$task")")")
    else
      steps+=("$(qjoin srun "${resources[@]}" bash -c "$task")")
    fi ;;
esac

# ------------------------------------------------------------------------------------ run
if [ "$dry_run" = 1 ]; then
  printf '%s\n' "${steps[@]}"
  exit 0
fi
last=$((${#steps[@]} - 1))
for i in "${!steps[@]}"; do
  if [ "$i" -eq "$last" ]; then
    exec bash -c "${steps[$i]}"
  fi
  echo "launch.sh: ${steps[$i]}" >&2
  bash -c "${steps[$i]}"
done
