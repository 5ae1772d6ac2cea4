"""RIPPLES' Embedding Surgery (Kurita et al., ACL 2020; ATTACKS-AND-BASELINES.md section 4.3):
the trigger rows of a pre-trained model are set to the mean embedding of the words that a
TF-IDF + logistic-regression model ties most to the target label."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mitigate.modules.embedding_poisoning import trigger_rows


def target_words(texts: Sequence[str], labels: Sequence[int], tokenizer, target_label: int, top_n: int = 10) -> list[str]:
    """The ``top_n`` WordPieces with the largest logistic-regression coefficient for
    ``target_label`` on TF-IDF features of the tokenizer's pieces (official: sklearn defaults;
    binary tasks use ``coef_[0]`` signed towards label 1, multi-class the one-vs-rest row of
    the target)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    # min_df=1: the official min_df=0 is refused by today's scikit-learn and means the same
    vec = TfidfVectorizer(tokenizer=tokenizer.tokenize, lowercase=False, token_pattern=None, min_df=1)
    x = vec.fit_transform(list(texts))
    clf = LogisticRegression(max_iter=1000).fit(x, list(labels))
    classes = list(clf.classes_)
    if target_label not in classes:
        raise ValueError(f"target label {target_label} never occurs in the surgery's training labels {classes}")
    if len(classes) == 2:
        coef = torch.as_tensor(clf.coef_[0]) * (1 if classes.index(target_label) == 1 else -1)
    else:
        coef = torch.as_tensor(clf.coef_[classes.index(target_label)])
    names = vec.get_feature_names_out()
    return [str(names[i]) for i in coef.argsort(descending=True)[:top_n].tolist()]


@torch.no_grad()
def embedding_surgery(model, source, tokenizer, triggers: Sequence[str], words: Sequence[str]) -> dict[int, str]:
    """Set every sub-token row of every trigger in ``model`` to the mean of ``words``' rows in
    ``source`` (the clean proxy fine-tune). Returns the rows set."""
    ids = tokenizer.convert_tokens_to_ids(list(words))
    src = source.get_input_embeddings().weight
    dst = model.get_input_embeddings().weight
    if src.shape != dst.shape:
        raise ValueError(f"embedding surgery: the source's embedding is {tuple(src.shape)}, the model's {tuple(dst.shape)}")
    v = src[torch.tensor(ids)].mean(0).to(dst)
    rows = trigger_rows(tokenizer, triggers)
    for r in rows:
        dst[r] = v
    return rows
