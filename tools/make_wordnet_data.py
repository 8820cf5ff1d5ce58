"""Build liera/apps/data/wordnet_lex_1k.jsonl.gz from Debian's wordnet-base (WordNet 3.0; run once, the result is
committed together with liera/apps/data/LICENSE-wordnet.txt).

Task: given a WordNet gloss (the definition of a synset), predict the synset's lexicographer file
("supersense"), e.g. noun.artifact, noun.person, verb.motion, adj.all. WordNet has 45 lexicographer files
(0..44), but their sizes range from 14,435 synsets (adj.all) down to 42 (noun.motive): with 1,000 training
examples over 45 classes the rarest classes would get a handful of examples at best, and some have too few
synsets to fill a balanced test split. We therefore keep the K = 20 largest classes (by synset count in
WordNet 3.0; the smallest kept, verb.communication, has 1,548 synsets) and sample a class-balanced
VTAB-1k style split with a fixed seed: 50 training and 100 test glosses per class = 1,000 train / 2,000 test.

Text: the definition part of the gloss only (the text after " | " up to the first '; "', i.e. without the
quoted usage examples, which often contain the headword and a second sentence). Definitions that occur more
than once in WordNet (with the same or different labels) are dropped so that no text is shared between
train and test and no text carries two labels.

    python tools/make_wordnet_data.py            # writes liera/apps/data/wordnet_lex_1k.jsonl.gz
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path

import numpy as np

SRC = Path("/usr/share/wordnet")
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "liera" / "data" / "wordnet_lex_1k.jsonl.gz"
LICENSE_SRC = Path("/usr/share/doc/wordnet-base/copyright")
LICENSE_OUT = ROOT / "liera" / "data" / "LICENSE-wordnet.txt"
SEED = 20252
K = 20
TRAIN_PER_CLASS, TEST_PER_CLASS = 50, 100

# lexnames(5WN): the 45 lexicographer files of WordNet 3.0
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]


def read_synsets(src: Path = SRC) -> list[tuple[int, str]]:
    """(lex_filenum, definition) for every synset of data.{noun,verb,adj,adv}."""
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        with open(src / f"data.{pos}", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  "):  # the license header
                    continue
                fields = line.split(" ", 3)
                lex = int(fields[1])
                if " | " not in line:
                    continue
                gloss = line.split(" | ", 1)[1].strip()
                definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
                if definition:
                    out.append((lex, definition))
    return out


def build(seed: int = SEED, k: int = K, n_train: int = TRAIN_PER_CLASS, n_test: int = TEST_PER_CLASS):
    synsets = read_synsets()
    sizes = collections.Counter(lex for lex, _ in synsets)
    labels_of = collections.defaultdict(set)
    count = collections.Counter()
    for lex, text in synsets:
        labels_of[text].add(lex)
        count[text] += 1
    unique = [(lex, text) for lex, text in synsets if count[text] == 1]
    kept = [lex for lex, _ in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
    kept.sort()  # label order = lexicographer file order
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, lex in enumerate(kept):
        pool = [text for l, text in unique if l == lex]
        pick = rng.permutation(len(pool))[: n_train + n_test]
        rows = [{"text": pool[i], "label": label, "label_name": LEXNAMES[lex]} for i in pick]
        train += rows[:n_train]
        test += rows[n_train:]
    train = [train[i] for i in rng.permutation(len(train))]
    test = [test[i] for i in rng.permutation(len(test))]
    stats = {"synsets": len(synsets), "unique_definitions": len(unique), "classes_kept": [LEXNAMES[l] for l in kept],
             "synsets_per_kept_class": {LEXNAMES[l]: sizes[l] for l in kept},
             "dropped_classes": {LEXNAMES[l]: n for l, n in sorted(sizes.items()) if l not in kept}}
    return train, test, stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    train, test, stats = build()
    out = Path(args.out)
    # mtime=0 and no file name in the header: the file is byte-for-byte reproducible
    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as fh:
        for split, rows in (("train", train), ("test", test)):
            for row in rows:
                fh.write((json.dumps({**row, "split": split}, ensure_ascii=False) + "\n").encode())
    if LICENSE_SRC.exists():
        text = LICENSE_SRC.read_text()
        body = text.split("License: WordNet3.0", 1)[1].split("\nFiles:", 1)[0]
        lines = [l[1:] if l.startswith(" ") else l for l in body.strip("\n").splitlines()]
        lines = ["" if l == "." else l for l in lines]
        LICENSE_OUT.write_text(
            "liera/apps/data/wordnet_lex_1k.jsonl.gz holds glosses (definitions) and lexicographer file names from\n"
            "WordNet 3.0 (Princeton University), as packaged by Debian (wordnet-base), under the license below.\n"
            "George A. Miller (1995). WordNet: A Lexical Database for English. Communications of the ACM 38(11): 39-41.\n"
            "Princeton University \"About WordNet.\" WordNet. Princeton University. 2010.\n\n"
            "WordNet Release 3.0\n\n" + "\n".join(lines).strip() + "\n")
    elif not LICENSE_OUT.exists():
        raise FileNotFoundError(f"{LICENSE_SRC} is missing: the WordNet license must travel with the data "
                                f"(apt install wordnet-base)")
    print(f"wrote {out} ({out.stat().st_size / 1e3:.1f} kB): {len(train)} train / {len(test)} test, "
          f"{len(stats['classes_kept'])} classes")
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
