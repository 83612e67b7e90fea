#!/usr/bin/env bash
# The attention grid: 4 mappings x 3 placements (10 distinct runs: softmax at any site is one
# model, trained once), on one cluster profile, with the launcher in the background
# (hydra-submitit-launcher waits until every job has ended; this keeps it off your terminal, so
# you can log out). Re-running the same command resumes every unfinished run from its own
# checkpoint and leaves finished ones as they are.
#
#   bash launch/sweep_attention.sh local_slurm experiment=smoke          # the local test cluster
#   SPARSE_DETR_ACCOUNT=berzelius-2025-123 \
#     bash launch/sweep_attention.sh berzelius experiment=detr_r50_coco data.root=/proj/coco
#   SPARSE_DETR_PARTITION=gpu bash launch/sweep_attention.sh rpl experiment=detr_r18_coco
#   bash launch/sweep_attention.sh local experiment=smoke               # here, one run after another
#
# Environment: MAPPINGS (default softmax,sparsemax,entmax15,alpha_entmax), PLACEMENTS (default
# encoder,decoder,cross), SPARSE_DETR_LOG_DIR (launcher logs, default outputs/launch), and the
# cluster profile's variables (see conf/cluster/<name>.yaml).
#
# It waits until every run has been validated (a bad value stops it here, with the valid choices),
# then prints the sweep folder; follow the runs with `sparse-detr-sweep status <sweep folder>`.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
cluster="$1"; shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ "$cluster" == local_slurm && -z "${SLURM_CONF:-}" ]]; then
    # The test cluster's config, so that sbatch/sacct (and the jobs) reach it.
    eval "$(bash "$here/slurm_test_cluster.sh" env)"
fi

mappings="${MAPPINGS:-softmax,sparsemax,entmax15,alpha_entmax}"
placements="${PLACEMENTS:-encoder,decoder,cross}"
log_dir="${SPARSE_DETR_LOG_DIR:-outputs/launch}"
mkdir -p "$log_dir"
log="$log_dir/sweep_attention-$cluster-$(date +%Y%m%d-%H%M%S).log"

command=(sparse-detr-train -m "cluster=$cluster" "attention=$mappings" "placement=$placements" "$@")
echo "${command[*]}" >"$log"
# A new session: closing the terminal does not stop the launcher (nor the runs it waits for).
setsid nohup "${command[@]}" </dev/null >>"$log" 2>&1 &
pid=$!

# Wait for the sweep's own check of every run (or for an early exit).
for _ in $(seq 1 240); do
    if grep -q "runs validated" "$log" 2>/dev/null; then
        sed -n 's/.*follow them with: //p' "$log" | tail -n 1
        echo "launcher pid $pid, log $log"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" && status=0 || status=$?
        cat "$log" >&2
        exit "$((status == 0 ? 1 : status))"
    fi
    sleep 0.5
done
echo "the launcher (pid $pid) has not validated the sweep after 2 minutes; see $log" >&2
exit 1
