#!/usr/bin/env bash
# A first run of mitigate, in minutes on a CPU: a BadNet victim on SST-2, its cleaning by
# MBTSAD, and the four test-time defenses on it. Each step is a shipped recipe with small
# limits (--trainer.limit_*_batches, fewer epochs): the same commands, without the limits,
# are the real runs (README.md). Numbers from so few steps say that everything runs, not how
# well it works.
#
#   bash scripts/smoke.sh [OUT_DIR]          (default runs/smoke; an earlier smoke run there is replaced)
set -euo pipefail
OUT="${1:-runs/smoke}"
COMMON=(--overwrite true --trainer.enable_model_summary false)
start=$(date +%s)

echo "== 1/3 the victim: BadNet on SST-2 (recipes/badnet_sst2.yaml), 1 epoch of 40 batches"
mitigate fit --config recipes/badnet_sst2.yaml --trainer.default_root_dir "$OUT/victim" \
  --trainer.max_epochs 1 --trainer.limit_train_batches 40 --trainer.limit_val_batches 2 --trainer.limit_test_batches 4 \
  --model.init_args.lr 2e-4 "${COMMON[@]}"  # a higher lr than the recipe: 40 batches instead of 3 epochs

echo "== 2/3 cleaning it: MBTSAD (recipes/mbtsad_sst2.yaml): the trigger scan (the whole vocabulary, ~75 s), a TS-FT epoch and a distillation epoch of 8 batches"
mitigate fit --config recipes/mbtsad_sst2.yaml --model.init_args.model "$OUT/victim/model" \
  --trainer.default_root_dir "$OUT/mbtsad" --trainer.max_epochs 2 --trainer.limit_train_batches 8 \
  --trainer.limit_val_batches 2 --trainer.limit_test_batches 4 --model.init_args.scan.verify_samples 16 "${COMMON[@]}"

echo "== 3/3 the test-time defenses on the victim (recipes/defend_smoke_sst2.yaml)"
mitigate test --config recipes/defend_smoke_sst2.yaml --model.init_args.model "$OUT/victim/model" \
  --trainer.default_root_dir "$OUT/defend" --overwrite true

echo "== done in $(( $(date +%s) - start )) s: $OUT/victim/results.md, $OUT/mbtsad/results.md, $OUT/defend/results.md"
