"""The repetition guard: a small model that sees one odd reply in its history tends to
start every later reply the same way ("A good man is someone who..."), or to loop on
itself within a reply. :class:`ReplyGuard` watches a reply as it streams:

* its opening (the first ``head_words`` words) is held back until it is complete and
  compared with the openings of the conversation's earlier replies: a match raises
  :class:`RepeatedOpening`, and the responder asks again without the history;
* past the first ``eager_chars`` characters, the last ``ngram - 1`` words stay held,
  so when a run of ``ngram`` words comes round a second time the reply is cut before
  the repeat, and :attr:`ReplyGuard.looped` is set (such a reply is never stored in
  the history). Within the first characters a loop is cut where it is found.

Holding the opening costs nothing audible: the first TTS chunk (about 32 characters)
needs about as many words anyway; holding more words there would delay the first
audio by their generation time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_WORD = re.compile(r"\S+")
_NORM = re.compile(r"[^a-z0-9']+")


class RepeatedOpening(Exception):
    """The reply starts like an earlier reply of the same conversation."""


def normalized_words(text: str) -> list[str]:
    words = (_NORM.sub("", w.lower()) for w in text.split())
    return [w for w in words if w]


def opening(text: str, head_words: int = 4) -> tuple[str, ...] | None:
    """The first ``head_words`` normalized words, or None for a shorter reply."""
    words = normalized_words(text)
    return tuple(words[:head_words]) if len(words) >= head_words else None


class ReplyGuard:
    """Feed the reply's pieces in; release only what passed the checks."""

    def __init__(self, earlier: Iterable[str], *, head_words: int = 4, ngram: int = 4,
                 raise_on_repeat: bool = True, eager_chars: int = 48) -> None:
        if ngram < 2:
            raise ValueError("ngram must be at least 2")
        self.head_words = head_words
        self.ngram = ngram
        self.raise_on_repeat = raise_on_repeat
        self.eager_chars = eager_chars
        """Until this much is released, complete words go out at once (they feed the
        first audio); only later are the last ``ngram - 1`` words held back."""
        self._openings = {o for e in earlier if (o := opening(e, head_words)) is not None}
        self._text = ""
        self._released = 0
        self._checked = 0
        """Complete words already looked at for loops."""
        self._seen: set[tuple[str, ...]] = set()
        self._head_done = False
        self.repeated = False
        """The opening repeats an earlier reply (only set when not raising)."""
        self.looped = False
        """The reply came round on itself and was cut."""

    def feed(self, piece: str) -> str:
        """Add ``piece``; return the text that may be released now."""
        if self.looped:
            return ""
        self._text += piece
        return self._advance(final=False)

    def finish(self) -> str:
        """The stream ended: check and release the rest."""
        if self.looped:
            return ""
        return self._advance(final=True)

    def text(self) -> str:
        """Everything released so far."""
        return self._text[:self._released]

    def _advance(self, *, final: bool) -> str:
        spans = [(m.start(), m.end()) for m in _WORD.finditer(self._text)]
        if not final and spans and spans[-1][1] == len(self._text):
            spans.pop()  # the last word may still grow
        words = [_NORM.sub("", self._text[a:b].lower()) for a, b in spans]
        if not self._head_done:
            if sum(1 for w in words if w) < self.head_words and not final:
                return ""  # (bullets and emoji are not words)
            self._head_done = True
            head = tuple(w for w in words if w)[:self.head_words]
            if len(head) == self.head_words and head in self._openings:
                if self.raise_on_repeat:
                    raise RepeatedOpening(" ".join(head))
                self.repeated = True
        cut: int | None = None
        for j in range(max(self._checked, self.ngram - 1), len(words)):
            gram = tuple(words[j - self.ngram + 1:j + 1])
            if gram in self._seen:
                cut = spans[j - self.ngram + 1][0]
                break
            self._seen.add(gram)
        self._checked = max(self._checked, len(words))
        if cut is not None:
            self.looped = True
            end = cut
        elif final:
            end = len(self._text)
        else:
            keep = len(spans) - (self.ngram - 1)  # hold the last ngram - 1 words
            end = spans[keep][0] if keep > 0 else self._released
            if self._released < self.eager_chars and spans:
                end = spans[-1][1]  # the first audio waits for nothing but the opening
        end = max(end, self._released)
        released, self._released = self._text[self._released:end], end
        return released
