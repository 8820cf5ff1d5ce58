"""Build liera/apps/data/wordnet_isa.jsonl.gz, the yes/no knowledge task of the language-model experiment, from
Debian's wordnet-base (WordNet 3.0; run once, the result is committed beside LICENSE-wordnet.txt).

Task: "Is a poodle a kind of dog?" -> yes / no. In the spirit of BoolQ / ARC: short questions whose answer is
world knowledge, scored by comparing the log-likelihood of the answers.

How the questions are made (fixed seed, reproducible byte for byte):
* CATEGORIES below name familiar WordNet noun synsets (dog, tree, tool, disease, ...). A word belongs to a
  category when its *first* (most frequent) sense is a hyponym of the category's synset, directly or through
  any chain of hypernyms (instances such as cities are not kinds and are left out).
* Words are lower-case WordNet lemmas, not containing the category's own word ("sheepdog" is not asked about
  "dog"): first those of one or two words with a sense-tagged occurrence in WordNet's corpus (tagsense_cnt > 0,
  a frequency filter), then, to fill a category up to MAX_PER_CATEGORY, untagged single words (rarer: "kittul",
  "gurnard"; the task mixes common and uncommon words, as ARC mixes easy and hard questions).
* A "yes" question pairs a word with a category its first sense belongs to; a "no" question pairs it with a
  category that *none* of its senses belongs to, half of the time one from the same lexicographer file
  (an animal asked about another animal category), half of the time any other category.
* Every word is asked about once, and the words are split into train / validation / test, so no word (and
  no question) is shared across splits; each split is balanced yes / no, and at most MAX_PER_CATEGORY
  words come from one category.

    python tools/make_wordnet_isa.py          # writes liera/apps/data/wordnet_isa.jsonl.gz
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path

import numpy as np

SRC = Path("/usr/share/wordnet")
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "liera" / "apps" / "data" / "wordnet_isa.jsonl.gz"
SEED = 20261205
SPLITS = {"train": 500, "validation": 250, "test": 500}
MAX_PER_CATEGORY = 45
# (lemma, sense number in WordNet 3.0, the words used in the question)
CATEGORIES = [
    ("dog", 1, "dog"), ("bird", 1, "bird"), ("fish", 1, "fish"), ("insect", 1, "insect"), ("snake", 1, "snake"),
    ("feline", 1, "cat"), ("rodent", 1, "rodent"), ("tree", 1, "tree"), ("flower", 1, "flower"),
    ("vegetable", 1, "vegetable"), ("edible_fruit", 1, "fruit"), ("herb", 1, "herb"), ("tool", 1, "tool"),
    ("vehicle", 1, "vehicle"), ("weapon", 1, "weapon"), ("musical_instrument", 1, "musical instrument"),
    ("garment", 1, "garment"), ("furniture", 1, "furniture"), ("building", 1, "building"),
    ("container", 1, "container"), ("beverage", 1, "drink"), ("cheese", 1, "cheese"), ("disease", 1, "disease"),
    ("sport", 1, "sport"), ("dance", 1, "dance"), ("fabric", 1, "fabric"), ("gem", 2, "gemstone"),
    ("metallic_element", 1, "metal"), ("feeling", 1, "feeling"), ("scientist", 1, "scientist"),
    ("musician", 1, "musician"), ("athlete", 1, "athlete"), ("vessel", 2, "ship or boat"),
    ("aircraft", 1, "aircraft"), ("dish", 2, "dish"), ("bone", 1, "bone"), ("room", 1, "room"),
    ("shoe", 1, "shoe"), ("hat", 1, "hat"), ("toy", 1, "toy"), ("game", 1, "game"), ("crime", 1, "crime"),
    ("religious_person", 1, "religious person"), ("rock", 2, "rock"),
]


def read_nouns(src: Path = SRC):
    """synset offset -> (lex file number, lemmas, hypernym offsets); lemma -> (sense offsets, tagsense count)."""
    synsets = {}
    with open(src / "data.noun", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  "):
                continue
            head = line.split(" | ", 1)[0].split()
            offset, lex, n_words = int(head[0]), int(head[1]), int(head[3], 16)
            words = [head[4 + 2 * i] for i in range(n_words)]
            at = 4 + 2 * n_words
            n_ptrs = int(head[at])
            hypernyms = []
            for i in range(n_ptrs):
                symbol, target, pos = head[at + 1 + 4 * i: at + 4 + 4 * i]
                if symbol == "@" and pos == "n":  # not "@i": an instance (Paris) is not a kind (of city)
                    hypernyms.append(int(target))
            synsets[offset] = (lex, words, hypernyms)
    senses = {}
    with open(src / "index.noun", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  "):
                continue
            f = line.split()
            lemma, n_senses, n_ptrs = f[0], int(f[2]), int(f[3])
            tagged = int(f[5 + n_ptrs])
            senses[lemma] = ([int(x) for x in f[6 + n_ptrs: 6 + n_ptrs + n_senses]], tagged)
    return synsets, senses


def ancestors(offset: int, synsets: dict, memo: dict) -> frozenset:
    if offset not in memo:
        out = set()
        for h in synsets[offset][2]:
            out.add(h)
            out |= ancestors(h, synsets, memo)
        memo[offset] = frozenset(out)
    return memo[offset]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def build(seed: int = SEED):
    synsets, senses = read_nouns()
    memo: dict = {}
    cats = []
    for lemma, sense, words in CATEGORIES:
        offset = senses[lemma][0][sense - 1]
        cats.append((lemma, words, offset, synsets[offset][0]))
    members = collections.defaultdict(lambda: ([], []))  # category index -> (tagged words, untagged words)
    for lemma, (offsets, tagged) in sorted(senses.items()):
        if not re.fullmatch(r"[a-z]+(_[a-z]+)?" if tagged else r"[a-z]+", lemma):
            continue
        first = ancestors(offsets[0], synsets, memo)
        for i, (clemma, words, offset, _) in enumerate(cats):
            if offset in first and not any(w in lemma for w in words.split() + clemma.split("_")):
                members[i][0 if tagged else 1].append(lemma)
    rng = np.random.default_rng(seed)
    used, pool = set(), []
    for i in rng.permutation(len(cats)):
        chosen = []
        for words in members[int(i)]:
            words = [w for w in words if w not in used]
            chosen += [words[j] for j in rng.permutation(len(words))]
        for w in chosen[:MAX_PER_CATEGORY]:
            used.add(w)
            pool.append((w, int(i)))
    pool = [pool[j] for j in rng.permutation(len(pool))]
    need = sum(SPLITS.values())
    if len(pool) < need:
        raise RuntimeError(f"only {len(pool)} words qualify; {need} needed")
    rows, start = [], 0
    for split, n in SPLITS.items():
        for k, (word, cat) in enumerate(pool[start:start + n]):
            every = set().union(*(ancestors(o, synsets, memo) for o in senses[word][0]))
            if k % 2 == 0:  # yes
                asked, answer = cat, "yes"
            else:  # no: a category no sense of the word belongs to, half of the time from the same lex file
                lex = cats[cat][3]
                wrong = [j for j, c in enumerate(cats) if c[2] not in every and j != cat]
                near = [j for j in wrong if cats[j][3] == lex]
                asked, answer = int(rng.choice(near if near and rng.random() < 0.5 else wrong)), "no"
            shown = word.replace("_", " ")
            rows.append({"split": split, "word": shown, "category": cats[asked][1],
                         "question": f"Is {article(shown)} {shown} a kind of {cats[asked][1]}?", "answer": answer})
        start += n
    stats = {"qualifying_words": len(pool), "per_category": {cats[i][1]: [len(x) for x in members[i]] for i in range(len(cats))},
             "splits": dict(collections.Counter(r["split"] for r in rows))}
    return rows, stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    rows, stats = build()
    out = Path(args.out)
    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as fh:
        for row in rows:
            fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    print(f"wrote {out} ({out.stat().st_size / 1e3:.1f} kB)")
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
