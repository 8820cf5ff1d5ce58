"""Small, local text datasets (nothing is downloaded). See tools/make_wordnet_data.py for how they were built."""

from __future__ import annotations

import gzip
import json

import numpy as np

from .data import DATA_DIR, TextTask

WORDNET_FILE = DATA_DIR / "wordnet_lex_1k.jsonl.gz"


def wordnet_lex_1k() -> TextTask:
    """WordNet 3.0 supersense classification, VTAB-1k style: given a synset's definition, predict its
    lexicographer file (noun.artifact, noun.person, verb.contact, adj.all, ...). The 20 largest of the 45
    lexicographer files, class-balanced: 1,000 training definitions (50 per class) and 2,000 test
    definitions (100 per class). WordNet 3.0 license: liera/apps/data/LICENSE-wordnet.txt."""
    with gzip.open(WORDNET_FILE, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    names: dict[int, str] = {}
    for row in rows:
        names[int(row["label"])] = row["label_name"]
    classes = [names[i] for i in range(len(names))]
    split = {s: [r for r in rows if r["split"] == s] for s in ("train", "test")}
    return TextTask(
        "wordnet-lex-1k",
        [r["text"] for r in split["train"]],
        np.array([int(r["label"]) for r in split["train"]], dtype=np.int64),
        [r["text"] for r in split["test"]],
        np.array([int(r["label"]) for r in split["test"]], dtype=np.int64),
        classes,
    )


def text_validation_split(task: TextTask, fraction: float = 0.2, seed: int = 0) -> TextTask:
    """A stratified validation split carved out of the training set (used as the test set of the result),
    as liera.apps.data.ImageTask.validation_split does for images."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(task.train_y), bool)
    for c in np.unique(task.train_y):
        idx = rng.permutation(np.flatnonzero(task.train_y == c))
        mask[idx[: max(1, int(round(len(idx) * fraction)))]] = True
    pick = lambda m: [t for t, k in zip(task.train_text, m, strict=True) if k]  # noqa: E731
    return TextTask(f"{task.name}-val", pick(~mask), task.train_y[~mask], pick(mask), task.train_y[mask], task.classes)
