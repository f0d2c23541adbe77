"""The wake phrase, matched on transcripts (``JARVIS_WAKE_WORD``): a request must start
with it, except within ``JARVIS_FOLLOW_UP_S`` after a reply."""

from __future__ import annotations

import re
import time
from collections.abc import Callable


class WakePhrase:
    """Decides whether a transcript is for Jarvis, and what the request in it is."""

    def __init__(self, phrase: str, follow_up_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.words = _words(phrase)
        self.follow_up_s = follow_up_s
        self._clock = clock
        self._follow_up_until = 0.0

    def replied(self) -> None:
        """A reply was given: the follow-up window opens."""
        self._follow_up_until = self._clock() + self.follow_up_s

    def following_up(self) -> bool:
        """The follow-up window after a reply is open."""
        return self._clock() < self._follow_up_until

    def request(self, text: str) -> tuple[str | None, bool]:
        """(the request in ``text``, whether the wake phrase was heard). The request is
        all of ``text`` when no wake phrase is configured or a follow-up is open, the
        words after the wake phrase (maybe ""), or None when ``text`` is not for us."""
        words = _words(text)
        if not words:
            return None, False
        if not self.words or self._clock() < self._follow_up_until:
            return text.strip(), False
        n = len(self.words)
        for start in range(min(3, len(words) - n + 1)):  # allow "ok, hey jarvis ..."
            window = words[start:start + n]
            if all(_sounds_alike(a, b) for a, b in zip(window, self.words, strict=True)):
                return _after_words(text, start + n), True
        return None, False


_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _sounds_alike(heard: str, expected: str) -> bool:
    """Word match that forgives one letter in longer words: speech recognition writes
    "jarvis" as "jervis" or "jarvus" often enough to matter for a wake phrase."""
    if heard == expected:
        return True
    if min(len(heard), len(expected)) < 5 or abs(len(heard) - len(expected)) > 1:
        return False
    return edit_distance(heard, expected) <= 1


def edit_distance(a: str, b: str) -> int:
    """Letters inserted, deleted or changed to turn ``a`` into ``b`` (Levenshtein)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _after_words(text: str, count: int) -> str:
    """``text`` without its first ``count`` words (and the punctuation after them)."""
    matches = list(re.finditer(r"[A-Za-z0-9']+", text))
    if count >= len(matches):
        return ""
    return text[matches[count].start():].strip()
