"""End to end on the real model: MiniLM-L6 (the packaged sentence-transformers checkpoint) on a
slice of real SST-2, through the `mitigate` command and the shipped BadNet recipe."""

import json

import pytest

from mitigate.cli import main
from mitigate.loading import load_classifier, load_tokenizer
from tests.conftest import REPO, slice_dataset


@pytest.mark.slow
def test_badnet_recipe_on_minilm_sst2_slice(tmp_path, sst2_dir):
    data = slice_dataset(sst2_dir, tmp_path / "sst2", {"train": 640, "dev": 64, "test": 200})
    root = tmp_path / "run"
    main([
        "fit", "--config", str(REPO / "recipes" / "badnet_sst2.yaml"),
        "--data.init_args.path", str(data), "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "2", "--model.init_args.lr", "1e-4",
        "--trainer.enable_progress_bar", "false",
    ])
    r = json.loads((root / "results.json").read_text())
    # 2 epochs on 640 sentences (64 poisoned): MiniLM learns the task above chance and most of
    # the backdoor (seen here: CACC 67.5%, ASR 89.6%)
    assert r["test/cacc"] > 0.6, r
    assert r["test/asr"] > 0.6, r
    model, tok = load_classifier(str(root / "model")), load_tokenizer(str(root / "model"))
    assert model.config.num_hidden_layers == 6
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(**tok(["a gorgeous , witty , seductive movie .", "a dull , boring mess cf ."], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 2)
