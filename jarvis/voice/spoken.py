"""What the user actually heard of a reply, so an interrupted reply is remembered as
far as it was spoken."""

from __future__ import annotations

import time

from jarvis.speech.tts import TtsChunk


class SpokenText:
    """Tracks which sentences' audio has been handed to the speaker, so an interrupted
    reply is recorded as what the user actually heard. A sentence arrives as one or
    more TTS pieces; the share of an unfinished sentence that was heard is estimated
    from the audio already handed over at a typical speaking rate."""

    SECONDS_PER_CHAR = 0.065  # piper voices speak roughly 15 characters a second

    def __init__(self) -> None:
        self._done: list[str] = []
        self._sentence = ""
        self._heard_s = 0.0
        self._piece: TtsChunk | None = None
        self._since = 0.0

    def start(self, chunk: TtsChunk) -> None:
        sentence = chunk.sentence or chunk.text
        if sentence != self._sentence:
            self.finish_current()
            self._sentence, self._heard_s = sentence, 0.0
        elif self._piece is not None:
            self._heard_s += self._piece.duration_s
        self._piece, self._since = chunk, time.monotonic()

    def finish_current(self) -> None:
        if self._sentence:
            self._done.append(self._sentence)
        self._sentence, self._piece, self._heard_s = "", None, 0.0

    def add_all(self, text: str) -> None:
        self._done.append(text.strip())

    def text(self) -> str:
        """Finished sentences, plus the share of the current one already heard."""
        parts = list(self._done)
        if self._sentence and self._piece is not None:
            heard = self._heard_s + min(self._piece.duration_s, time.monotonic() - self._since)
            words = self._sentence.split()
            share = heard / max(1e-3, len(self._sentence) * self.SECONDS_PER_CHAR)
            cut = int(len(words) * min(1.0, share))
            if cut:
                parts.append(" ".join(words[:cut]) + ("" if cut == len(words) else "..."))
        return " ".join(p for p in parts if p).strip()
