import pytest
import torch

from mitigate.data import BackdoorDataModule, DataError
from mitigate.attacks import BadNet
from mitigate.data.sampling import ResumableDataLoader, SeededShuffleSampler
from tests.conftest import MINILM, write_tsv


def _dm(path, **kw):
    kw.setdefault("poisoner", BadNet(poison_rate=0.1, target_label=1))
    return BackdoorDataModule(str(path), tokenizer=MINILM, **kw)


def test_sets_and_sizes(sst2_small):
    dm = _dm(sst2_small, batch_size=8)
    dm.setup("fit")
    assert dm.num_classes == 2
    assert len(dm.datasets["train"]) == 128
    assert sum(ex.poisoned for ex in dm.datasets["train"].examples) == int(0.1 * 128)
    n_neg_dev = sum(ex.label == 0 for ex in dm.clean_splits["dev"])
    assert len(dm.datasets["dev_poisoned"]) == n_neg_dev
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "trigger_mask", "labels", "poisoned", "index"}
    # evaluation covers clean and poisoned samples exactly once
    seen = sum(len(b["labels"]) for b in dm.val_dataloader())
    assert seen == 64 + n_neg_dev


def test_clean_subset_is_a_seeded_fraction(sst2_small):
    a = _dm(sst2_small, train_set="clean_subset", clean_fraction=0.25)
    b = _dm(sst2_small, train_set="clean_subset", clean_fraction=0.25)
    assert len(a.clean_subset) == 32 and a.clean_subset == b.clean_subset
    assert not any(ex.poisoned for ex in a.examples("train"))
    assert a.clean_subset != _dm(sst2_small, train_set="clean_subset", clean_fraction=0.25, seed=1).clean_subset


def test_any_number_of_classes(tmp_path):
    rows = [(f"text number {i}", i % 3) for i in range(30)]
    for s in ("train", "dev", "test"):
        write_tsv(tmp_path / f"{s}.tsv", rows)
    dm = _dm(tmp_path, poisoner=BadNet(target_label=2, poison_rate=0.2))
    assert dm.num_classes == 3
    dm.setup("test")
    assert len(dm.datasets["test_poisoned"]) == 20


def test_label_out_of_range_in_test(tmp_path):
    write_tsv(tmp_path / "train.tsv", [("a", 0), ("b", 1)])
    write_tsv(tmp_path / "dev.tsv", [("a", 0)])
    write_tsv(tmp_path / "test.tsv", [("a", 0), ("b", 5)])
    with pytest.raises(DataError, match=r"test\.tsv:3: label 5 is outside 0\.\.1"):
        _dm(tmp_path).num_classes


def test_bad_settings(tmp_path, sst2_small):
    with pytest.raises(ValueError, match="needs a poisoner"):
        BackdoorDataModule(str(sst2_small), poisoner=None, train_set="poisoned")
    with pytest.raises(ValueError, match="target_label 4 is not a class of the data"):
        _dm(sst2_small, poisoner=BadNet(target_label=4)).num_classes
    with pytest.raises(DataError, match="not a folder"):
        _dm(tmp_path / "nowhere").num_classes


def test_resumable_loader_skips_consumed_batches():
    data = list(range(20))
    make = lambda: ResumableDataLoader(data, batch_size=4, sampler=SeededShuffleSampler(20, seed=3))  # noqa: E731
    full = [b.tolist() for b in make()]
    dl = make()
    it = iter(dl)
    first = [next(it).tolist() for _ in range(2)]
    state = dl.state_dict()
    assert state == {"batches_yielded": 2}
    resumed = make()
    resumed.load_state_dict(state)
    assert first + [b.tolist() for b in resumed] == full
    # a finished epoch is not skipped again
    done = make()
    list(done)
    again = make()
    again.load_state_dict(done.state_dict())
    assert [b.tolist() for b in again] == full
    s = SeededShuffleSampler(20, seed=3)
    s.set_epoch(1)
    assert list(s) != list(SeededShuffleSampler(20, seed=3))
    assert sorted(s) == list(range(20))
    assert torch.equal(torch.tensor(list(s)), torch.tensor(list(s)))


def test_group_by_length_sampler_makes_homogeneous_random_batches():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (1000,), generator=g).tolist()
    s = SeededShuffleSampler(1000, seed=5, lengths=lengths, batch_size=10, window=20)
    order = list(s)
    assert sorted(order) == list(range(1000)) and order == list(s)  # a permutation, deterministic
    batches = [order[i : i + 10] for i in range(0, 1000, 10)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 5  # random batches of 10 from 3..59 spread over ~45
    padded = sum(10 * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)
    s.set_epoch(1)
    assert list(s) != order
    # batch order is shuffled, not sorted by length
    maxes = [max(lengths[i] for i in b) for b in batches]
    assert maxes != sorted(maxes) and maxes != sorted(maxes, reverse=True)
    with pytest.raises(ValueError, match="batch_size"):
        SeededShuffleSampler(1000, lengths=lengths)


def test_without_a_poisoner_there_is_no_poisoned_set(sst2_small, bert_tokenizer):
    dm = BackdoorDataModule(str(sst2_small), tokenizer=bert_tokenizer.name_or_path, train_set="clean")
    dm.setup("fit")
    assert len(dm.datasets["dev_poisoned"]) == 0 and len(dm.datasets["train"]) == 128
    batch = next(iter(dm.val_dataloader()))
    assert not batch["poisoned"].any()


def test_batch_index_points_back_to_each_sample(sst2_small, bert_tokenizer):
    dm = BackdoorDataModule(str(sst2_small), poisoner=BadNet(), eval_batch_size=16)
    dm.setup("test")
    for batch in dm.test_dataloader():
        for ids, attn, p, i in zip(batch["input_ids"], batch["attention_mask"], batch["poisoned"], batch["index"]):
            ex = dm.dataset("test_poisoned" if p else "test").examples[int(i)]
            assert bert_tokenizer(ex.text)["input_ids"] == ids[attn.bool()].tolist()


def test_eval_loader_on_a_subset_gives_exactly_those_samples_shortest_first(sst2_small):
    from types import SimpleNamespace

    from mitigate.defenses import STRIP

    dm = _dm(sst2_small, eval_batch_size=8)
    dm.setup("fit")
    defense = STRIP(calib_samples=20)
    picked = defense.held_out_indices(SimpleNamespace(datamodule=dm))
    assert len(set(picked)) == 20 and picked == defense.held_out_indices(SimpleNamespace(datamodule=dm))  # seeded
    assert STRIP().held_out_indices(SimpleNamespace(datamodule=dm)) == list(range(64))
    batches = list(dm.eval_loader("dev", indices=picked))
    assert sorted(int(i) for b in batches for i in b["index"]) == sorted(picked)
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths)
    with pytest.raises(ValueError, match="indices select from one set"):
        dm.eval_loader("dev", "dev_poisoned", indices=picked)


def test_clean_subset_loader_is_the_plain_clean_data_under_token_split(tmp_path, sst2_small):
    """The clean control trains on ``train_dataloader(name="clean_subset")``: the defender's
    clean texts themselves, never their token-split augmentation (the training set then)."""
    from mitigate.data.token_split import TokenSplit

    dm = _dm(sst2_small, train_set="clean_subset", clean_fraction=0.25,
             token_split=TokenSplit(copies=2, cache_dir=str(tmp_path)))
    assert len(dm.examples("train")) > len(dm.clean_subset)
    assert dm.examples("clean_subset") == dm.clean_subset
    loader = dm.train_dataloader(one_process=True, name="clean_subset")
    seen = sorted(i for batch in loader for i in batch["index"].tolist())
    assert seen == list(range(len(dm.clean_subset)))
