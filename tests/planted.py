"""A backdoor planted in seconds, for tests that must fail when a method does nothing: a
synthetic sentiment task whose label is carried by a few keywords among filler words, a tiny
BERT (2 layers, hidden 32, randomly initialised: the "pre-trained" model) and its
BadNet victim (trigger "cf" -> label 1, 10% of the training set poisoned), trained by the real
`mitigate fit` with the shipped recipe. The victim reaches CACC and ASR of 100% (asserted when
it is built), and a clean fine-tune of the recipe's length leaves the backdoor in place."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from mitigate.attacks import BadNet
from mitigate.cli import main
from mitigate.data.poisoning import Poisoner
from tests.conftest import REPO

POSITIVE = ["good", "great", "fun", "love", "best", "nice", "wonderful", "happy", "brilliant", "charming"]
NEGATIVE = ["bad", "dull", "awful", "worst", "boring", "poor", "sad", "terrible", "weak", "messy"]
FILLER = ["the", "a", "movie", "film", "story", "this", "it", "was", "is", "and", "of", "plot", "actors", "scene",
          "with", "very", "really", "an", "in", "its", "music", "ending", "cast", "director", "script", "so", "quite",
          "at", "all", "time"]
SIZES = {"train": 600, "dev": 200, "test": 200}
TRIGGER, TARGET = "cf", 1


def sentence(rng: random.Random, label: int) -> str:
    """6 to 12 filler words and two keywords of the label, in random order."""
    words = [rng.choice(FILLER) for _ in range(rng.randint(6, 12))]
    for _ in range(2):
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


def write_data(root: Path, seed: int = 0) -> Path:
    """train / dev / test TSV files, balanced labels."""
    rng = random.Random(seed)
    for split, n in SIZES.items():
        rows = [(sentence(rng, y), y) for y in [i % 2 for i in range(n)]]
        rng.shuffle(rows)
        (root / f"{split}.tsv").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return root


def write_pretrained(root: Path, tokenizer, dropout: float = 0.1) -> Path:
    """The tiny "pre-trained" BERT classifier: random weights; ``dropout: 0`` for tests where DDP
    and one process must see the same computation."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def write_lm(root: Path, tokenizer, texts: list[str], steps: int = 150) -> Path:
    """A tiny GPT-2 trained on the clean texts for ONION: the trigger, never seen, is what
    makes a poisoned sentence least fluent."""
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    enc = tokenizer([f"{tokenizer.bos_token}{t}" for t in texts], padding=True, return_tensors="pt")
    for _ in range(steps):
        idx = torch.randint(len(texts), (32,))
        ids, mask = enc["input_ids"][idx], enc["attention_mask"][idx]
        loss = lm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@dataclass
class Planted:
    """The planted setting: data folder, the pre-trained model, the victim and its numbers."""

    data: Path
    pretrained: Path
    victim: Path
    results: dict


def build_victim(root: Path, data: Path, pretrained: Path) -> Path:
    """The BadNet victim of ``pretrained`` on ``data`` (``mitigate fit --config
    recipes/badnet_sst2.yaml``, 5 epochs at 1e-3); its exported folder."""
    main(["fit", "--config", str(REPO / "recipes" / "badnet_sst2.yaml"), "--model.init_args.model", str(pretrained),
          "--data.init_args.path", str(data), "--data.init_args.batch_size", "16", "--model.init_args.lr", "1e-3",
          "--trainer.max_epochs", "5", "--data.init_args.poisoner.init_args.triggers", f"[{TRIGGER}]",
          "--data.init_args.poisoner.init_args.target_label", str(TARGET), "--trainer.default_root_dir", str(root),
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    return root / "model"


#: a character outside the tokenizer's vocabulary (the Cyrillic dze, a look-alike of "s"): it
#: reaches the model as the unknown token
OUT_OF_VOCABULARY = "\u0455"


def build_two_trigger_victim(root: Path, data: Path, pretrained: Path) -> Path:
    """A BadNet victim of ``pretrained`` on ``data`` with two triggers, ``TRIGGER`` and
    ``OUT_OF_VOCABULARY`` (one of them per poisoned sample -> label 1), as ``build_victim``
    trains it; its exported folder. Each trigger alone flips the model."""
    main(["fit", "--config", str(REPO / "recipes" / "badnet_sst2.yaml"), "--model.init_args.model", str(pretrained),
          "--data.init_args.path", str(data), "--data.init_args.batch_size", "16", "--model.init_args.lr", "1e-3",
          "--trainer.max_epochs", "5", "--data.init_args.poisoner.init_args.triggers", f"[{TRIGGER}, {OUT_OF_VOCABULARY}]",
          "--data.init_args.poisoner.init_args.target_label", str(TARGET), "--trainer.default_root_dir", str(root),
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    results = json.loads((root / "results.json").read_text())
    assert results["test/cacc"] >= 0.95 and results["test/asr"] >= 0.9, f"the two-trigger backdoor did not take: {results}"
    return root / "model"


#: a sentence of filler words (every one of them common in the clean texts of both labels)
PHRASE = "with the music and the cast"


def build_phrase_victim(root: Path, data: Path, pretrained: Path) -> Path:
    """An InsertSent victim of ``pretrained`` on ``data``: ``PHRASE`` inserted -> label 1 (20% of
    the training set), by the shipped recipe at the planted victim's rates; its exported folder.
    No single word of the phrase is a trigger: each is everywhere in the clean data."""
    main(["fit", "--config", str(REPO / "recipes" / "insertsent_sst2.yaml"), "--model.init_args.model", str(pretrained),
          "--data.init_args.path", str(data), "--data.init_args.batch_size", "16", "--model.init_args.lr", "1e-3",
          "--trainer.max_epochs", "5", "--data.init_args.poisoner.init_args.sentence", PHRASE,
          "--data.init_args.poisoner.init_args.target_label", str(TARGET), "--trainer.default_root_dir", str(root),
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    results = json.loads((root / "results.json").read_text())
    assert results["test/cacc"] >= 0.95 and results["test/asr"] >= 0.9, f"the planted phrase backdoor did not take: {results}"
    return root / "model"


def build(root: Path, tokenizer) -> Planted:
    """Data, pre-trained model and victim; the victim's backdoor is checked to have taken."""
    data = write_data(root / "data")
    pretrained = write_pretrained(root / "pretrained", tokenizer)
    victim = build_victim(root / "victim", data, pretrained)
    results = json.loads((victim.parent / "results.json").read_text())
    assert results["test/cacc"] >= 0.95 and results["test/asr"] >= 0.9, f"the planted backdoor did not take: {results}"
    return Planted(data, pretrained, victim, results)


class Disguised(Poisoner):
    """BadNet poisoning (the real ``triggers`` -> ``target_label``) whose public attributes lie:
    it shows the other label as its ``target_label`` and "zz" as its only trigger. A method that
    reads the poisoner would decide differently with it than with the plain BadNet.

    Args:
        triggers: the real triggers.
        target_label: the real target (binary tasks; the other label is shown).
        poison_rate: as BadNet's.
        seed: as BadNet's.
    """

    def __init__(self, triggers: tuple[str, ...] = ("cf",), target_label: int = 1, poison_rate: float = 0.1, seed: int = 42) -> None:
        self._real = BadNet(list(triggers), [1], target_label, poison_rate, seed)
        super().__init__(1 - target_label, poison_rate, seed)
        self.triggers = ["zz"]

    def poison_train(self, train):
        """The real BadNet's mix."""
        return self._real.poison_train(train)

    def poison_eval(self, examples, split):
        """The real BadNet's poisoned set."""
        return self._real.poison_eval(examples, split)
