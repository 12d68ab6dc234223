"""The keyword score: BM25 of a prompt against each adapter's card.

Each routable adapter's card is one document: its description, keywords and example prompts.
A prompt is scored against all of them with BM25 (Robertson & Zaragoza 2009, "The
Probabilistic Relevance Framework"), in Lucene's variant, which `bm25s` implements:

    score(q, d) = sum over words t of q in d:  idf(t) * tf(t, d) / (tf(t, d) + k1 (1 - b + b |d| / avgdl))
    idf(t)      = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))            N documents, df(t) containing t

Lucene's idf stays positive however few documents there are (rank-bm25's Robertson idf goes
negative for a word in more than half of a handful of cards, which is exactly our case).

The raw score grows with the prompt's length, so the router uses it relative to what the
prompt could score at most: `keyword_scores` divides by the sum of idf(t) over the prompt's
words, counting a word no card has at the idf of df = 0. The result is in [0, 1): the share of
the prompt's informative words that the card explains. `bm25_reference` is the same formula
in plain NumPy, the oracle for the tests.

Words: lowercase runs of letters, at least two long (digits are values, not what a task is
about), stopwords removed, plural, -ing/-ed and final-e endings stripped (`stem`), so
"Converts" in a card matches "convert" in a prompt, "reverse" matches "reversed".
"""

from __future__ import annotations

import math
import re

import numpy as np

K1, B = 1.5, 0.75            # BM25's usual saturation and length normalization (bm25s defaults)

_WORD = re.compile(r"[a-z]{2,}")
# bm25s's English stopwords (Lucene's list) plus pronouns, auxiliaries and politeness words,
# which appear in every kind of request and say nothing about which task it is.
STOPWORDS = frozenset("""a an and are as at be but by for if in into is it no not of on or such
that the their then there these they this to was will with i me my we our you your he she him
her its do does did am been being have has had can could would should may might shall must
what which who whom whose when where why how please just so some any also very here than""".split())


def stem(word: str) -> str:
    """A light suffix stripper, the same for cards and prompts: a plural (queries -> query,
    converts -> convert), then -ing or -ed, then a final e (reversed, reverse -> revers;
    writing, write -> writ). Crude, but both sides meet on the same stem."""
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    if word.endswith("e") and len(word) > 4:
        word = word[:-1]
    return word


def words(text: str) -> list[str]:
    """The words BM25 counts, in order (repeats kept: they are term frequencies)."""
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def card_text(card: dict, examples: list[str]) -> str:
    """One document per adapter: description, keywords and example prompts."""
    return " ".join([str(card.get("description", "")), " ".join(map(str, card.get("keywords", []))),
                     *examples])


class KeywordIndex:
    """BM25 over N card documents; `scores(prompt)` -> [N] float32 in [0, 1)."""

    def __init__(self, documents: list[str]):
        import bm25s

        self.n_docs = len(documents)
        self._docs = [words(d) for d in documents]
        self._bm25 = bm25s.BM25(k1=K1, b=B, method="lucene")
        if any(self._docs):          # bm25s cannot index a corpus without a single word
            self._bm25.index(self._docs, show_progress=False)
        df: dict[str, int] = {}
        for d in self._docs:
            for w in set(d):
                df[w] = df.get(w, 0) + 1
        self._df = df

    def idf(self, word: str) -> float:
        df = self._df.get(word, 0)
        return math.log(1.0 + (self.n_docs - df + 0.5) / (df + 0.5))

    def raw_scores(self, prompt_words: list[str]) -> np.ndarray:
        """[N] float32 BM25 scores of every card for these words."""
        known = [w for w in prompt_words if w in self._df]
        if not known:                # (also: no card has a word, so bm25s indexed nothing)
            return np.zeros(self.n_docs, np.float32)
        return np.asarray(self._bm25.get_scores(known), np.float32)

    def scores(self, prompt: str) -> np.ndarray:
        """[N] float32: BM25 over the most the prompt's words could score (see the module doc)."""
        q = words(prompt)
        if not q or not self.n_docs:
            return np.zeros(self.n_docs, np.float32)
        return self.raw_scores(q) / np.float32(sum(self.idf(w) for w in q))


def bm25_reference(query: list[str], documents: list[list[str]], k1: float = K1,
                   b: float = B) -> np.ndarray:
    """[N] float64: the Lucene BM25 formula of the module doc, written out (the tests' oracle)."""
    n = len(documents)
    lengths = np.array([len(d) for d in documents], np.float64)           # [N]
    avgdl = lengths.mean()
    out = np.zeros(n)
    for t in query:
        df = sum(t in d for d in documents)
        if df == 0:
            continue
        idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5))
        tf = np.array([d.count(t) for d in documents], np.float64)       # [N]
        out += idf * tf / (tf + k1 * (1.0 - b + b * lengths / avgdl))
    return out
