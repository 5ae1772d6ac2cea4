#!/usr/bin/env bash
# Trains the SST-2 victims and the clean reference model with the shipped recipes, one after
# the other, and prints each run's results table and wall time. About 25 minutes a recipe
# on a 2-core CPU. Usage: scripts/run_attacks.sh [recipe ...] (default: all four).
set -euo pipefail
recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(badnet_sst2 badnet_imbert_sst2 insertsent_sst2 clean_sst2)
for r in "${recipes[@]}"; do
  start=$(date +%s)
  mitigate fit --config "recipes/$r.yaml"
  echo "== $r: $(( $(date +%s) - start )) s"
  cat "runs/$r/results.md"
done
