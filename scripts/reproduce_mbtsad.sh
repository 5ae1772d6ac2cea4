#!/usr/bin/env bash
# Reproduces the MBTSAD tables of the README from the victims exported by
# scripts/run_attacks.sh (runs/<victim>/model): for each victim, clean fine-tuning (CFT) and
# MBTSAD (whose report also holds TS-FT alone: its teacher) on the same 20% clean data, then
# one table. Usage: scripts/reproduce_mbtsad.sh [victim ...]
# (victims: badnet_sst2 insertsent_sst2 badnet_imbert_sst2; default: all three).
# Extra `mitigate` flags for every run can be given in $MITIGATE_FLAGS.
set -euo pipefail
victims=("$@")
[ ${#victims[@]} -gt 0 ] || victims=(badnet_sst2 insertsent_sst2 badnet_imbert_sst2)
start_all=$(date +%s)
for v in "${victims[@]}"; do
  overlay=()
  [ "$v" = badnet_sst2 ] || overlay=(--config "recipes/victims/$v.yaml")
  [ -d "runs/$v/model" ] || { echo "runs/$v/model missing: run scripts/run_attacks.sh $v first" >&2; exit 1; }
  for method in cft mbtsad; do
    start=$(date +%s)
    # shellcheck disable=SC2086
    mitigate fit --config "recipes/${method}_sst2.yaml" "${overlay[@]}" \
      --trainer.default_root_dir "runs/mbtsad/$v/$method" ${MITIGATE_FLAGS:-}
    echo "== $v / $method: $(( $(date +%s) - start )) s"
  done
done
python scripts/mbtsad_table.py "${victims[@]}"
echo "total wall time: $(( $(date +%s) - start_all )) s"
