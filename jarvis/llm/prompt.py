"""Prompts as tokens: the chat formatted with the model's own template, the exact
tokens of earlier replies spliced back in, and the prefixes every prompt shares."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from jarvis.llm.base import ChatMessage

_MAX_REMEMBERED_REPLIES = 1024


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class ChatPrompt:
    """Formats and tokenizes chats for one loaded model (``llm``, a ``llama_cpp.Llama``)
    with the Jinja chat ``template``; remembers the tokens of the replies it generated."""

    def __init__(self, llm: Any, template: str) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        vocab = llm._model
        eos_id, bos_id = llm.token_eos(), llm.token_bos()
        self._llm = llm
        self._formatter: Any = Jinja2ChatFormatter(
            template=template,
            eos_token=vocab.token_get_text(eos_id) if eos_id >= 0 else "",
            bos_token=vocab.token_get_text(bos_id) if bos_id >= 0 else "",
        )
        self._replies: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def tokenize(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt for ``messages`` as the model's own chat template formats it,
        ending with the assistant turn's opening.

        An assistant message this engine generated is spliced in as the exact tokens it
        generated, not re-tokenized: sampled tokens are often not the canonical
        tokenization of their text, and re-tokenizing would break the prefix match with
        the KV state (and make the next turn re-evaluate most of the reply).
        """
        result = self._formatter(messages=[{"role": m.role, "content": m.content}
                                           for m in messages])
        prompt: str = result.prompt
        segments: list[str | tuple[int, ...]] = []
        cursor = 0
        for message in messages:
            content = message.content.strip()
            generated = self._replies.get(content) if message.role == "assistant" else None
            at = prompt.find(content, cursor) if generated and content else -1
            if generated and at >= 0:
                segments += [prompt[cursor:at], generated]
                cursor = at + len(content)
        segments.append(prompt[cursor:])
        tokens: list[int] = []
        for index, segment in enumerate(segments):
            if isinstance(segment, tuple):
                tokens += segment
            elif segment:
                add_bos = index == 0 and not result.added_special
                tokens += self._llm.tokenize(segment.encode("utf-8"), add_bos=add_bos,
                                             special=True)
        return tokens

    def remember_reply(self, text: str, tokens: list[int]) -> None:
        """Keep the tokens generated for ``text`` so a later prompt containing this reply
        reproduces them exactly (bounded: the most recent replies only)."""
        key = text.strip()
        if not key or not tokens:
            return
        self._replies[key] = tuple(tokens)
        self._replies.move_to_end(key)
        while len(self._replies) > _MAX_REMEMBERED_REPLIES:
            self._replies.popitem(last=False)

    def shared_start(self, history: Sequence[ChatMessage]) -> list[int]:
        """Tokens every prompt that continues ``history`` with a user turn starts with:
        the common prefix of two prompts that differ only in the user's words."""
        a = self.tokenize([*history, ChatMessage("user", "a")])
        b = self.tokenize([*history, ChatMessage("user", "b")])
        return a[: common_prefix(a, b)]

    def system_prefix(self, system_prompt: str) -> tuple[int, ...]:
        """Tokens shared by every prompt that starts with ``system_prompt``."""
        return tuple(self.shared_start([ChatMessage("system", system_prompt)]))
