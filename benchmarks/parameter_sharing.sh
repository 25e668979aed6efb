#!/usr/bin/env bash
# Shared vs separate parameters for mappo and every sequential system at equal budget (issue 14):
# 2M steps, 3 vmapped seeds, each system's defaults otherwise, one XLA CPU device, one JSON per task.
#
#   bash benchmarks/parameter_sharing.sh lbf 10x10-3p-3f
#   bash benchmarks/parameter_sharing.sh connector con-7x7x5a
#
# Writes results/sharing_<env>_<task>.json (algorithm names ff_<system>_<shared|separate>) and
# benchmarks/results/curves/sharing_<env>_<task>_2M.png, and prints the final and absolute numbers.
# SYSTEMS="a2po happo" limits the systems; a rerun of one system replaces only its entries.
set -euo pipefail
env_name=$1 task=$2
systems=${SYSTEMS:-"mappo coppo happo a2po"}
json=results/sharing_${env_name}_${task}.json
mkdir -p results
for system in $systems; do
  for sharing in shared separate; do
    echo "== $system $sharing on $env_name/$task ($(date -u +%H:%M:%S))"
    python "systems/${system}_anakin.py" env="$env_name" env.task="$task" network.parameter_sharing="$sharing" \
      arch.total_timesteps=2000000 arch.num_evaluation=20 arch.num_seeds=3 arch.num_devices=1 \
      logger.progress=false logger.plot=false logger.checkpoint.enabled=false logger.json_path="$json" \
      | tail -n 2
  done
done
python -m utils.plots "$json" --env "$env_name" --task "$task" \
  --out "benchmarks/results/curves/sharing_${env_name}_${task}_2M.png"
