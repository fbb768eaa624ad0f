"""Transcript metrics: word error rate on case- and punctuation-normalised text."""

import re

_NOT_WORD = re.compile(r"[^a-z0-9' ]+")


def normalize_text(text: str) -> list[str]:
    """Lower-case, turn punctuation and hyphens into spaces, drop quote marks; returns the words.

    "Don't stop-now!" -> ["don't", "stop", "now"]. Apostrophes inside words are kept (don't != dont),
    leading/trailing ones (quotes) are dropped.
    """
    text = _NOT_WORD.sub(" ", text.lower().replace("\u2019", "'"))
    return [w.strip("'") for w in text.split() if w.strip("'")]


def word_error_rate(ref: str, hyp: str) -> float:
    """(substitutions + deletions + insertions) / number of reference words, after `normalize_text`.

    A Levenshtein distance over words; an empty reference gives 0.0 for an empty hypothesis, else 1.0 per
    inserted word (so it is not bounded by 1).
    """
    r, h = normalize_text(ref), normalize_text(hyp)
    prev = list(range(len(h) + 1))  # distance from r[:0] to h[:j]
    for i, rw in enumerate(r, start=1):
        cur = [i] + [0] * len(h)
        for j, hw in enumerate(h, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
        prev = cur
    return prev[-1] / max(len(r), 1)
