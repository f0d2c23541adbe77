"""Cutting text that arrives in pieces (LLM tokens) into speakable chunks as soon as
each is complete: sentence ends (``. ! ? …``, decided the moment the punctuation
arrives unless it may belong to an abbreviation or a number), paragraph breaks, and,
for a long first sentence, a clause boundary (``, ; :``) or a space between words so
the first audio comes sooner. It does not cut ``Dr.``, ``e.g.``, ``U.S.``, initials,
``3.5`` or a leading ``1.``; an overlong run without punctuation is cut at a space,
which bounds memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "mx", "dr", "prof", "sr", "jr", "st", "mt", "ft", "gen", "gov",
    "sgt", "capt", "cpt", "lt", "col", "rev", "hon", "pres", "vs", "etc", "approx", "appt",
    "dept", "est", "inc", "ltd", "co", "corp", "fig", "cf", "al", "ave", "blvd", "rd",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
})
_DOTTED = re.compile(r"(?:[a-z]\.)+[a-z]")  # e.g, i.e, u.s, a.m
_TERMINALS = ".!?…"
_CLOSERS = "\"')]}’”»"
_LEADING_JUNK = _TERMINALS + _CLOSERS + " \t\r\n"
_WEAK_ENDINGS = frozenset({
    "a", "an", "the", "to", "of", "in", "on", "at", "by", "for", "from", "with", "and", "or",
    "but", "so", "as", "is", "are", "was", "be", "my", "your", "its", "their", "our", "this",
    "that",
})
"""Words a first chunk cut between words should not end with."""
_CLAUSE = re.compile(r"[,;:](?=\s)|(?<=\s)[-–—](?=\s)")


@dataclass
class SentenceSplitter:
    """Incremental splitter: ``feed`` pieces, get finished chunks; ``flush`` at the end."""

    first_soft_chars: int = 32
    """A first sentence longer than this is cut at its last clause boundary within it,
    else at its last word boundary, so the first audio waits for neither a long
    sentence nor a late comma: each character costs ~4 ms to generate and ~4 ms to
    synthesise, while the chunk plays for ~65 ms per character."""
    soft_chars: int = 120
    """Any later chunk longer than this is cut at its last clause boundary."""
    hard_chars: int = 240
    """Without a clause boundary, a chunk longer than this is cut at its last space."""
    min_clause_chars: int = 12
    """A clause cut leaves at least this many characters in the chunk."""
    _buf: str = field(default="", init=False)
    _scan: int = field(default=0, init=False)
    _emitted: int = field(default=0, init=False)

    def feed(self, piece: str) -> list[str]:
        self._buf += piece
        self._strip()
        return self._drain(final=False)

    def flush(self) -> list[str]:
        out = self._drain(final=True)
        rest = _clean(self._buf)
        self._buf, self._scan = "", 0
        if speakable(rest):
            out.append(rest)
        return out

    def _strip(self) -> None:
        """Drop what cannot start a chunk: spaces and the tail of the previous
        sentence's punctuation ("?!" may arrive as "?" then "!")."""
        stripped = self._buf.lstrip(_LEADING_JUNK)
        self._scan = max(0, self._scan - (len(self._buf) - len(stripped)))
        self._buf = stripped

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        while self._buf:
            end = self._boundary(final)
            if end is None:
                break
            chunk, self._buf, self._scan = _clean(self._buf[:end]), self._buf[end:], 0
            self._strip()
            if speakable(chunk):
                out.append(chunk)
                self._emitted += 1
        return out

    def _boundary(self, final: bool) -> int | None:
        """End index of the first complete chunk in the buffer, or None to wait.

        A sentence that ends within the soft limit is one chunk; a longer one is cut
        at its last clause boundary within the limit, else at the first one after it,
        else at the last space before the hard limit. Lengths are counted up to the
        sentence's first closing punctuation mark, so the answer does not depend on
        how the text was cut into pieces.
        """
        soft = self.first_soft_chars if self._emitted == 0 else self.soft_chars
        end, at = self._sentence_end(final)
        if end is not None and at is not None and at < soft:
            return end
        if end is None and ((at is not None and at < soft) or len(self._buf) <= soft):
            return None  # the sentence may still end within the limit
        if self._emitted == 0 and (cut := self._first_cut(soft)) is not None:
            return cut
        cut = self._clause_cut(at if at is not None else len(self._buf), soft)
        if cut is not None and cut <= self.hard_chars:
            return cut
        if end is not None and at is not None and at < self.hard_chars:
            return end
        if len(self._buf) > self.hard_chars:
            space = self._buf.rfind(" ", 0, self.hard_chars)
            return space if space > 0 else self.hard_chars
        return None

    def _sentence_end(self, final: bool) -> tuple[int | None, int | None]:
        """``(end, at)``: the first sentence ends at ``end``, its punctuation starts
        at ``at``; ``(None, at)``: punctuation at ``at`` waits for the next piece;
        ``(None, None)``: no sentence end yet."""
        buf = self._buf
        i = self._scan
        while i < len(buf):
            ch = buf[i]
            if ch == "\n":
                return i + 1, i
            if ch not in _TERMINALS:
                i += 1
                continue
            j = i
            while j < len(buf) and buf[j] in _TERMINALS:
                j += 1
            while j < len(buf) and buf[j] in _CLOSERS:
                j += 1
            if j == len(buf) and not final:
                if self._eager(i):
                    return j, i
                self._scan = i
                return None, i  # "3." may become "3.5", "e." may become "e.g."
            if j == len(buf):
                return j, i
            if buf[j] in " \t\r\n" and not (
                buf[i:j].rstrip(_CLOSERS) == "." and self._protected(i)
            ):
                return j, i
            i = j
        self._scan = len(buf)
        return None, None

    def _eager(self, dot: int) -> bool:
        """Whether a terminal that ends the text so far ends a sentence for sure: ``!``,
        ``?``, an ellipsis, or a period after a word that is no abbreviation, initial
        or number. Deciding without waiting for the next token saves one token's
        time on every sentence (LLM tokens carry their space in front: "now" "." " The")."""
        run = self._buf[dot:].rstrip(_CLOSERS)
        if run != ".":
            return True
        words = self._buf[:dot].split()
        return bool(words) and not words[-1][-1].isdigit() and not self._protected(dot)

    def _first_cut(self, soft: int) -> int | None:
        """Where the first chunk ends when its sentence is too long: the last clause
        boundary within ``soft`` characters, else the last space. Looks at no more than
        ``soft + 1`` characters, so the result does not depend on how text arrived."""
        head = self._buf[: soft + 1]
        clause = self._clause_cut(len(head), soft)
        if clause is not None and clause <= soft:
            return clause
        space = head.rfind(" ", self.min_clause_chars)
        while space > 0:  # "turns on at | sunset" sounds odd: end on a content word
            earlier = head.rfind(" ", self.min_clause_chars, space)
            if earlier < 0 or head[earlier + 1:space].lower() not in _WEAK_ENDINGS:
                break
            space = earlier
        return space if space > 0 else None

    def _clause_cut(self, limit: int, soft: int) -> int | None:
        best = None
        for m in _CLAUSE.finditer(self._buf, 0, limit):
            if m.end() < self.min_clause_chars:
                continue
            if m.end() <= soft:
                best = m.end()
            else:
                return best if best is not None else m.end()
        return best

    def _protected(self, dot: int) -> bool:
        """Whether the period at ``dot`` ends an abbreviation, an initial or a list number."""
        words = self._buf[:dot].split()
        if not words:
            return True
        word = words[-1].lstrip("\"'([{‘“«").lower()
        if word in _ABBREVIATIONS or _DOTTED.fullmatch(word):
            return True
        if len(word) == 1 and word.isalpha():
            return True  # an initial: "J. R. R. Tolkien"
        return word.isdigit() and len(words) == 1  # "1. Turn on ..." at the start


def _clean(text: str) -> str:
    return " ".join(text.split())


def speakable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def split_sentences(text: str) -> list[str]:
    """All chunks of a complete text (what the streaming splitter would emit)."""
    splitter = SentenceSplitter()
    return splitter.feed(text) + splitter.flush()
