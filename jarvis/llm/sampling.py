"""One sampler per sequence: the settings and grammar of its own request.

The chain is the one ``llama_cpp.Llama.generate`` builds (repetition penalties, the
grammar, top-k, typical, top-p, min-p, temperature, a seeded draw; greedy at
temperature 0), so batched replies are sampled exactly as single ones were.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from jarvis.errors import BackendError

_PENALTY_LAST_N = 64
"""Tokens the repetition penalty looks back over (``Llama``'s ``last_n_tokens_size``)."""
_MIN_P = 0.05


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_k: int
    top_p: float
    repeat_penalty: float
    seed: int


class Sampler:
    """A llama.cpp sampler chain for one request; :meth:`close` frees it."""

    def __init__(self, lib: Any, model: Any, n_vocab: int, params: SamplingParams,
                 grammar: Any = None) -> None:
        self._lib = lib
        chain: Any = importlib.import_module("llama_cpp._internals").LlamaSampler()
        try:
            chain.add_penalties(n_vocab=n_vocab, penalty_last_n=_PENALTY_LAST_N,
                                penalty_repeat=params.repeat_penalty, penalty_freq=0.0,
                                penalty_present=0.0)
            if grammar is not None:
                _add_grammar(lib, chain, model, grammar)
            if params.temperature < 0.0:
                chain.add_dist(params.seed)
            elif params.temperature == 0.0:
                chain.add_greedy()
            else:
                chain.add_top_k(params.top_k)
                chain.add_typical(1.0, 1)
                chain.add_top_p(params.top_p, 1)
                chain.add_min_p(_MIN_P, 1)
                chain.add_temp(params.temperature)
                chain.add_dist(params.seed)
        except BaseException:
            chain.close()
            raise
        self._chain = chain

    def sample(self, ctx: Any, index: int) -> int:
        """Draw the next token from the logits at batch position ``index`` of the last
        decode (the token is also accepted into the chain's state)."""
        return int(self._lib.llama_sampler_sample(self._chain.sampler, ctx, index))

    def close(self) -> None:
        self._chain.close()


def _add_grammar(lib: Any, chain: Any, model: Any, grammar: Any) -> None:
    """Constrain ``chain`` to ``grammar`` (a ``LlamaGrammar``: GBNF text and its root)."""
    text = getattr(grammar, "_grammar", None)
    root = getattr(grammar, "_root", "root")
    if not isinstance(text, str):
        raise BackendError(f"the grammar must be GBNF text or a LlamaGrammar, not "
                           f"{type(grammar).__name__}")
    grammar_sampler = lib.llama_sampler_init_grammar(model.vocab, text.encode("utf-8"),
                                                     root.encode("utf-8"))
    if not grammar_sampler:
        raise BackendError("llama.cpp could not parse the grammar (see its log)")
    lib.llama_sampler_chain_add(chain.sampler, grammar_sampler)
