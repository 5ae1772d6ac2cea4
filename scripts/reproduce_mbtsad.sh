#!/usr/bin/env bash
# The MBTSAD tables of docs/mbtsad.md from the victims of scripts/run_attacks.sh
# (runs/<victim>/model) and the clean reference models (runs/clean_sst2, runs/clean_olid):
# for each victim, the clean model's ASR on its poisoned test set (the floor), clean
# fine-tuning (CFT), TS-FT alone and MBTSAD, all on the same 20% clean data; then one table.
# A finished run (results.json present) is not run again: the script resumes.
#   scripts/reproduce_mbtsad.sh [victim ...]          (default: the four below)
#   MITIGATE_SEEDS="43 44" scripts/reproduce_mbtsad.sh badnet_sst2   (more MBTSAD seeds)
# Extra `mitigate` flags for every run can be given in $MITIGATE_FLAGS.
set -euo pipefail
victims=("$@")
[ ${#victims[@]} -gt 0 ] || victims=(badnet_sst2 badnet_imbert_sst2 insertsent_sst2 badnet_olid)
start_all=$(date +%s)
run() {  # run DIR ARGS...: one `mitigate` run into DIR unless it finished before
  local dir=$1; shift
  if [ -f "$dir/results.json" ]; then echo "== $dir: done before"; return; fi
  local start; start=$(date +%s)
  # shellcheck disable=SC2086
  mitigate "$@" --trainer.default_root_dir "$dir" ${MITIGATE_FLAGS:-}
  echo "== $dir: $(( $(date +%s) - start )) s"
}
for v in "${victims[@]}"; do
  overlay=()
  [ "$v" = badnet_sst2 ] || overlay=(--config "recipes/victims/$v.yaml")
  [ -d "runs/$v/model" ] || { echo "runs/$v/model missing: run scripts/run_attacks.sh $v first" >&2; exit 1; }
  clean=runs/clean_sst2/model; [ "$v" = badnet_olid ] && clean=runs/clean_olid/model
  run "runs/mbtsad/$v/floor" test --config recipes/clean_sst2.yaml "${overlay[@]}" --model.init_args.model "$clean"
  for method in cft tsft mbtsad; do
    run "runs/mbtsad/$v/$method" fit --config "recipes/${method}_sst2.yaml" "${overlay[@]}"
  done
  for s in ${MITIGATE_SEEDS:-}; do
    run "runs/mbtsad/$v/mbtsad_seed$s" fit --config recipes/mbtsad_sst2.yaml "${overlay[@]}" --seed_everything "$s" \
      --data.init_args.seed "$s" --data.init_args.token_split.init_args.seed "$s" --model.init_args.scan.init_args.seed "$s"
  done
done
python scripts/mbtsad_table.py "${victims[@]}"
echo "total wall time: $(( $(date +%s) - start_all )) s"
