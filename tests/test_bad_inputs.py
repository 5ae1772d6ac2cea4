"""Bad inputs as a careful user and a security reviewer try them (issue 9): every one ends in
ONE clear last line on stderr (``mitigate: error: <option or file>: <what is wrong>``), with no
traceback or config dump on the screen, and a non-zero exit status. Nothing is silently
wrong (labels checked, triggers compared as token ids) and no run is lost (a finished run
folder is refused). Each case runs the real command in-process on a tiny model and a slice of
SST-2; the list is the regression suite for error reporting."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from mitigate.cli import main
from tests.conftest import REPO, write_tsv

RECIPE = str(REPO / "recipes" / "badnet_sst2.yaml")


@dataclass
class Case:
    id: str
    args: list[str]  # after the common ones; {names} are filled from the fixture's paths
    expect: str  # must appear in the last stderr line
    command: str = "fit"
    code: int = 1
    common: bool = True
    extra_setup: dict = field(default_factory=dict)
    traceback: bool = True  # a log with the traceback is named; not for a wrong option (code 2) or bad data


class Slowish:
    """A class that a weights_only load refuses (a pickled object, not a plain value)."""


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_bert, sst2_small):
    """Data folders, model folders and checkpoints with one defect each."""
    from mitigate.loading import load_classifier, load_tokenizer
    from tests.conftest import _tiny_model_dir

    root = tmp_path_factory.mktemp("bad")
    p = {"tiny": str(tiny_bert), "data": str(sst2_small), "root": str(root)}
    good = [("a good film", 1), ("a bad film", 0)] * 4

    def data(name, files: dict[str, str]):
        d = root / "data" / name
        d.mkdir(parents=True)
        for split in ("train", "dev", "test"):
            if split in files:
                (d / split).with_suffix(files[split][0]).write_bytes(files[split][1])
            else:
                write_tsv(d / f"{split}.tsv", good)
        p[name] = str(d)

    tsv = lambda body: (".tsv", ("sentence\tlabel\n" + body).encode())  # noqa: E731
    data("no_train", {"train": (".txt", b"sentence\tlabel\n")})
    data("empty", {"train": (".tsv", b"")})
    data("no_label_column", {"train": (".tsv", b"sentence\ty\nx\t1\n")})
    data("bad_label", {"train": tsv("x\t1\ny\tpositive\n")})
    data("extra_field", {"train": tsv("x\t1\ny\t0\tz\n")})
    data("not_utf8", {"train": (".tsv", b"sentence\tlabel\nx\t1\n\xff\xfe\t0\n")})
    data("empty_text", {"train": tsv("x\t1\n \t0\n")})
    data("bad_json", {"train": (".jsonl", b'{"sentence": "x", "label": 1}\n{"sentence": "y", "label": \n')})
    data("json_missing", {"train": (".jsonl", b'{"sentence": "x", "label": 1}\n{"text": "y", "label": 0}\n')})
    data("missing_class", {"train": tsv("x\t0\ny\t2\n")})
    data("negative_label", {"train": tsv("x\t0\ny\t-1\n")})
    data("one_class", {"train": tsv("x\t0\ny\t0\n")})
    data("test_label_5", {"test": tsv("x\t1\ny\t0\nz\t5\n")})
    data("dev_label_2", {"dev": tsv("x\t1\ny\t2\n")})
    data("huge_field", {"train": (".csv", b'sentence,label\nok,1\n"unclosed,0\n' + b"x" * 140_000 + b"\n")})
    # a classifier with 3 labels; pickled weights only; a folder without weights
    p["three_labels"] = str(_tiny_model_dir(root / "three_labels", load_tokenizer(str(tiny_bert)), 3))
    pickled = root / "pickled"
    model = load_classifier(str(tiny_bert))
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    (root / "no_weights").mkdir()
    model.config.save_pretrained(root / "no_weights")
    p["pickled"], p["no_weights"] = str(pickled), str(root / "no_weights")
    # a model that never predicts class 1 (RAP has nothing to calibrate on)
    biased = load_classifier(str(tiny_bert))
    with torch.no_grad():
        biased.classifier.bias.copy_(torch.tensor([50.0, -50.0]))
    biased.save_pretrained(root / "biased")
    load_tokenizer(str(tiny_bert)).save_pretrained(root / "biased")
    p["biased"] = str(root / "biased")
    # a real checkpoint, and copies whose stored settings (or contents) were tampered with
    run = root / "ckpt_run"
    main(common_args(p, run) + ["--trainer.max_epochs", "1", "--checkpoint.every_n_train_steps", "3", "--checkpoint.keep", "last"])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    p["ckpt"] = str(root / "good.ckpt")
    torch.save(ckpt, p["ckpt"])
    for name, change in {
        "other_model": {"model": str(root / "elsewhere")},
        "allow_pickle": {"allow_pickle": True},
        "other_class": {"_class_path": "mitigate.mitigations.MBTSAD"},
        "other_lr": {"lr": 0.5},
    }.items():
        bad = {**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"], **change}}
        torch.save(bad, root / f"{name}.ckpt")
        p[f"ckpt_{name}"] = str(root / f"{name}.ckpt")
    torch.save({**ckpt, "datamodule_hyper_parameters": {**ckpt["datamodule_hyper_parameters"], "path": "/elsewhere"}},
               root / "other_data.ckpt")
    p["ckpt_other_data"] = str(root / "other_data.ckpt")
    torch.save({**ckpt, "payload": Slowish()}, root / "pickle_payload.ckpt")
    p["ckpt_pickle_payload"] = str(root / "pickle_payload.ckpt")
    (root / "garbage.ckpt").write_bytes(b"not a checkpoint")
    p["ckpt_garbage"] = str(root / "garbage.ckpt")
    p["finished"] = str(run)
    return p


def common_args(p: dict, root, command: str = "fit") -> list[str]:
    args = [
        command, "--config", RECIPE, "--model.init_args.model", p["tiny"], "--data.init_args.path", p["data"],
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--data.init_args.batch_size", "16",
    ]
    if command == "fit":
        args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--export.max_class_share", "null"]
    return args


def defense(cls: str, **init) -> list[str]:
    out = [f"--trainer.callbacks+=mitigate.defenses.{cls}"]
    for k, v in init.items():
        out += [f"--trainer.callbacks.{k}", str(v)]
    return out


D = "--data.init_args."
P = "--data.init_args.poisoner.init_args."
M = "--model.init_args."
TS = ["--data.init_args.token_split", "mitigate.data.TokenSplit"]
MB = ["--model", "mitigate.mitigations.MBTSAD", "--model.init_args.model", "{tiny}"]

CASES = [
    # data files: the file, the line, the field
    Case("data-path-missing", [D + "path", "{root}/nowhere"], "not a folder", traceback=False),
    Case("no-train-file", [D + "path", "{no_train}"], "no train file", traceback=False),
    Case("empty-file", [D + "path", "{empty}"], "train.tsv:1: empty file", traceback=False),
    Case("no-label-column", [D + "path", "{no_label_column}"], "train.tsv:1: missing column 'label'", traceback=False),
    Case("label-not-integer", [D + "path", "{bad_label}"], "train.tsv:3: field 'label' must be an integer label", traceback=False),
    Case("extra-field", [D + "path", "{extra_field}"], "train.tsv:3: 3 fields, the header has 2", traceback=False),
    Case("not-utf8", [D + "path", "{not_utf8}"], "train.tsv:3: bytes that are not UTF-8", traceback=False),
    Case("empty-text", [D + "path", "{empty_text}"], "train.tsv:3: field 'sentence' is empty", traceback=False),
    Case("bad-json", [D + "path", "{bad_json}"], "train.jsonl:2: not valid JSON", traceback=False),
    Case("json-missing-field", [D + "path", "{json_missing}"], "train.jsonl:2: missing field 'sentence'", traceback=False),
    Case("missing-class", [D + "path", "{missing_class}"], "class(es) [1] have no samples", traceback=False),
    Case("negative-label", [D + "path", "{negative_label}"], "negative label -1", traceback=False),
    Case("one-class", [D + "path", "{one_class}"], "only one class", traceback=False),
    Case("test-label-out-of-range", [D + "path", "{test_label_5}"], "test.tsv:4: label 5 is outside 0..1", traceback=False),
    Case("dev-label-out-of-range", [D + "path", "{dev_label_2}"], "dev.tsv:3: label 2 is outside 0..1", traceback=False),
    Case("csv-field-too-large", [D + "path", "{huge_field}"], "train.csv:3: the row starting here cannot be read", traceback=False),
    # data and attack settings
    Case("poison-rate-above-1", [P + "poison_rate", "1.5"], "BadNet: poison_rate must be in [0, 1], got 1.5"),
    Case("poison-rate-not-a-number", [P + "poison_rate", "abc"], "data.poisoner.poison_rate: Expected a <class 'float'>", code=2),
    Case("poison-rate-too-high-for-data", [P + "poison_rate", "0.9"], "asks for 115 poisoned samples but only 53 training samples have a label other than the target 1"),
    Case("clean-fraction-0", [D + "clean_fraction", "0"], "clean_fraction must be in (0, 1], got 0.0"),
    Case("clean-fraction-above-1", [D + "clean_fraction", "1.5"], "clean_fraction must be in (0, 1], got 1.5"),
    Case("poisoned-training-without-poisoner", [D + "poisoner", "null"], "train_set='poisoned' needs a poisoner"),
    Case("train-set-unknown", [D + "train_set", "everything"], "data.train_set", code=2),
    Case("target-label-not-a-class", [P + "target_label", "5"], "data.poisoner.target_label 5 is not a class of the data (labels 0..1)"),
    Case("no-triggers", [P + "triggers", "[]"], "triggers must be non-empty single words"),
    Case("two-word-trigger", [P + "triggers", "[cf mn]"], "triggers must be non-empty single words"),
    Case("zero-triggers-per-sample", [P + "num_triggers", "[0]"], "num_triggers must be positive counts"),
    Case("insertsent-empty", [D + "poisoner", "mitigate.attacks.InsertSent", P + "sentence", " "], "sentence must not be empty"),
    Case("prepoisoned-missing-folder", [D + "poisoner", "mitigate.attacks.PrePoisoned", P + "path", "{root}/nowhere"], "no such folder"),
    Case("token-split-no-copies", [*TS, D + "token_split.init_args.copies", "0"], "token_split.copies must be >= 1"),
    Case("token-split-aug-p", [*TS, D + "token_split.init_args.aug_p", "2"], "token_split.aug_p must be in [0, 1]"),
    Case("token-split-min-char", [*TS, D + "token_split.init_args.min_char", "2"], "token_split.min_char must be >= 3"),
    Case("unknown-option", ["--model.init_args.bogus", "1"], "model: Option 'bogus' is not accepted", code=2),
    Case("unknown-flag", ["--nope", "1"], "unrecognized arguments: --nope 1", code=2),
    # models
    Case("model-folder-missing", [M + "model", "{root}/runs/victim/model"], "no such model folder"),
    Case("model-relative-missing", [M + "model", "runs/nothing"], "not a local folder, and the hub could not provide it"),
    Case("model-is-a-file", [M + "model", RECIPE], "is a file, not a model folder"),
    Case("pickled-weights", [M + "model", "{pickled}"], "has only pickled weights"),
    Case("no-weights", [M + "model", "{no_weights}"], "no model weights"),
    Case("label-count-mismatch", [M + "model", "{three_labels}"], "a classifier with 3 labels, but the data has 2 classes"),
    Case("schedule-unknown", [M + "schedule", "cosine"], "model.schedule", code=2),
    Case("mbtsad-teacher-and-tsft", [*MB, M + "teacher", "{tiny}", M + "tsft_epochs", "1"], "set model.tsft_epochs to 0"),
    Case("mbtsad-no-tsft-no-teacher", [*MB, M + "tsft_epochs", "0"], "model.tsft_epochs must be >= 1"),
    Case("mbtsad-too-few-epochs", [*MB, M + "tsft_epochs", "1", *TS], "must exceed model.tsft_epochs"),
    Case("mbtsad-ablation-unknown", [*MB, M + "ablation", "no-ce"], "model.ablation", code=2),
    # checkpoints given to --ckpt_path
    Case("resume-without-checkpoint", ["--ckpt_path", "last"], "--ckpt_path last: no checkpoint to resume"),
    Case("checkpoint-file-missing", ["--ckpt_path", "{root}/none.ckpt"], "no such checkpoint file"),
    Case("checkpoint-garbage", ["--ckpt_path", "{ckpt_garbage}"], "not a checkpoint written by Lightning"),
    Case("checkpoint-pickle-payload", ["--ckpt_path", "{ckpt_pickle_payload}"], "would unpickle code from the file; refused"),
    Case("checkpoint-switches-model", ["--ckpt_path", "{ckpt_other_model}"], "model.init_args.model: checkpoint"),
    Case("checkpoint-turns-on-allow-pickle", ["--ckpt_path", "{ckpt_allow_pickle}"], "model.init_args.allow_pickle: checkpoint True, this run False"),
    Case("checkpoint-switches-class", ["--ckpt_path", "{ckpt_other_class}"], "model.class_path: checkpoint mitigate.mitigations.MBTSAD"),
    Case("checkpoint-changes-lr", ["--ckpt_path", "{ckpt_other_lr}"], "model.init_args.lr: checkpoint 0.5, this run 2e-05"),
    Case("checkpoint-switches-data", ["--ckpt_path", "{ckpt_other_data}"], "data.init_args.path: checkpoint '/elsewhere'"),
    # run folders
    Case("fit-into-finished-run", [], "already holds the outputs of an earlier `fit` run", extra_setup={"root": "finished"}),
    # test-time defenses
    Case("rap-protect-not-a-class", defense("RAP", protect_label=2), "rap: protect_label 2 is not a class of the data", command="test"),
    *[
        Case(f"rap-word-is-trigger-{i}", defense("RAP", word=w), "default trigger of public attacks", command="test")
        for i, w in enumerate(["cf", " cf", "cf ", "cf\t", "cf\u200b", "çf", "CF"])
    ],
    Case("rap-word-two-tokens", defense("RAP", word="zyxwvut"), "must be one sub-token", command="test"),
    Case("rap-nothing-predicted-as-protect", [*defense("RAP", epochs=1, protect_label=1), M + "model", "{biased}"], "predicts none of the", command="test"),
    Case("strip-no-copies", defense("STRIP", copies=0), "STRIP: copies must be >= 1", command="test"),
    Case("imbert-k-0", defense("IMBERT", k=0), "IMBERT: k must be >= 1, got 0", command="test"),
    Case("imbert-saliency-unknown", defense("IMBERT", saliency="random"), "saliency", command="test", code=2),
    Case("strip-frr-0", defense("STRIP", frr=0), "frr is a percentage in (0, 100)", command="test"),
    Case("rap-margins", defense("RAP", c_low=0.3, c_up=0.1), "need 0 <= c_low < c_up", command="test"),
    Case("test-into-tested-run", [], "already holds the outputs of an earlier `test` run", command="test", extra_setup={"root": "finished"}),
]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_in_one_clear_line(case: Case, paths, tmp_path, capsys):
    root = paths[case.extra_setup["root"]] if "root" in case.extra_setup else tmp_path / "run"
    args = common_args(paths, root, case.command) + [a.format(**paths) for a in case.args]
    code, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, err[-3000:]
    assert lines and lines[-1].startswith("mitigate: error: "), err[-3000:]
    assert case.expect in lines[-1], lines[-1]
    assert "Traceback" not in err and "Given value" not in err and "usage:" not in err, err[-3000:]
    pointer = [line for line in lines if line.startswith("(traceback: ")]
    if case.code == 2 or not case.traceback:  # a wrong option or bad data: the one line says it all
        assert not pointer, err[-3000:]
        return
    # the full traceback is kept in a log file named on the line before
    assert pointer == lines[-2:-1], err[-3000:]
    log_file = lines[-2].split(": ", 1)[1].split(";")[0]
    assert "Traceback" in Path(log_file).read_text()


def test_bad_input_list_covers_the_reported_cases():
    assert len(CASES) >= 59 and len({c.id for c in CASES}) == len(CASES)


def test_overwrite_replaces_a_finished_run_and_resume_continues_one(paths, tmp_path, capsys):
    root = tmp_path / "run"
    main(common_args(paths, root))
    first = (root / "model" / "model.safetensors").stat().st_mtime_ns
    code, err = run_cli(common_args(paths, root), capsys)  # refused, nothing touched
    assert code == 1 and "--overwrite true" in err.splitlines()[-1]
    assert (root / "model" / "model.safetensors").stat().st_mtime_ns == first
    main(common_args(paths, root) + ["--overwrite", "true"])
    assert (root / "model" / "model.safetensors").stat().st_mtime_ns != first
    assert json.loads((root / "results.json").read_text())["test/cacc"] >= 0


def test_debug_switch_raises_the_original_error(paths, tmp_path, monkeypatch):
    monkeypatch.setenv("MITIGATE_DEBUG", "1")
    with pytest.raises(Exception, match="poison_rate must be in"):
        main(common_args(paths, tmp_path / "run") + [P + "poison_rate", "1.5"])
