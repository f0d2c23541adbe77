"""Word error rate: how far a transcript is from what was said (benchmarks and tests;
nothing at run time needs it)."""

from __future__ import annotations

from jarvis.speech.asr import normalize_words


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference word count) after
    :func:`normalize_words`; word error rate = errors / count."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[len(hyp)], len(ref)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / reference length (see :func:`word_errors`)."""
    errors, count = word_errors(reference, hypothesis)
    return errors / count if count else float(errors > 0)
