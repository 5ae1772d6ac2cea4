#!/usr/bin/env bash
# The weight-poisoning victims of docs/weight_attacks.md and every shipped mitigation and
# defense on them. Needs the clean reference model runs/clean_sst2 (recipes/clean_sst2.yaml).
# A finished run (results.json present) is not run again: the script resumes.
set -euo pipefail
run() {  # run DIR ARGS...
  local dir=$1; shift
  if [ -f "$dir/results.json" ]; then echo "== $dir: done before"; return; fi
  local start; start=$(date +%s)
  mitigate "$@" --trainer.default_root_dir "$dir" ${MITIGATE_FLAGS:-}
  echo "== $dir: $(( $(date +%s) - start )) s"
}
[ -d runs/clean_sst2/model ] || run runs/clean_sst2 fit --config recipes/clean_sst2.yaml
run runs/ep_sst2 fit --config recipes/ep_sst2.yaml
run runs/lwp_sst2 fit --config recipes/lwp_sst2.yaml
run runs/ripples_sst2 fit --config recipes/ripples_sst2.yaml
run runs/ripples_victim_sst2 fit --config recipes/ripples_victim_sst2.yaml
# the RIPPLe paper's baseline: plain BadNet poisoning of the same model, same steps, same user fine-tune
run runs/ripples_badnet_sst2 fit --config recipes/ripples_sst2.yaml --model.init_args.lam 0 --model.init_args.surgery_source null
run runs/ripples_badnet_victim_sst2 fit --config recipes/ripples_victim_sst2.yaml --model.init_args.model runs/ripples_badnet_sst2/model
for v in ep_sst2 lwp_sst2 ripples_victim_sst2; do
  scripts/reproduce_mbtsad.sh "$v"   # the floor, CFT, TS-FT alone, MBTSAD
  run "runs/defend/$v" test --config recipes/defend_quick_sst2.yaml --config "recipes/victims/$v.yaml"
done
# the clean model's false-trigger rate (LWP's single pieces)
run runs/mbtsad/lwp_sst2/floor_single_piece test --config recipes/clean_sst2.yaml --config recipes/victims/lwp_sst2.yaml \
  --model.init_args.model runs/clean_sst2/model --trainer.callbacks+=mitigate.evaluation.FalseTriggerRate
python scripts/weight_attack_table.py
