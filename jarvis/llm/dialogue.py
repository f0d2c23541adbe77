"""Conversation history, laid out so the context cache keeps hitting: the system
prompt first, then the turns in order, and nothing volatile (no timestamp) in front
of the history. Old turns are dropped whole, oldest first, when ``max_turns`` is hit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jarvis.llm.base import ChatMessage


@dataclass
class Conversation:
    """One dialogue: a system prompt and alternating user/assistant turns."""

    system_prompt: str
    max_turns: int = 16
    """Completed turns kept. When there are more, the oldest half go at once: every
    trim changes the prompt right after the system prompt, so the backend must slide
    the kept turns' KV state back (``JARVIS_CACHE_SLIDE``) or evaluate them again;
    trimming rarely and in bulk keeps either cheap."""
    turns: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, user_text: str) -> list[ChatMessage]:
        """The messages for the model when the user says ``user_text`` next."""
        msgs = [ChatMessage("system", self.system_prompt)] if self.system_prompt else []
        for user, assistant in self.turns:
            msgs += [ChatMessage("user", user), ChatMessage("assistant", assistant)]
        msgs.append(ChatMessage("user", user_text))
        return msgs

    def add_turn(self, user_text: str, reply: str) -> None:
        """Record a finished turn; ``reply`` is what was actually said (it may be cut
        short by a cancel)."""
        self.turns.append((user_text, reply.strip()))
        if len(self.turns) > self.max_turns:
            del self.turns[: len(self.turns) - self.max_turns // 2]

    def history(self) -> list[ChatMessage]:
        """The messages every next prompt starts with (system prompt and turns)."""
        return self.messages("")[:-1]
