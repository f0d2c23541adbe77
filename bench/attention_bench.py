#!/usr/bin/env python3
"""Flash attention on or off, for what a voice turn costs on this machine.

Loads the starter model twice in one process (``flash_attn`` on and off), evaluates
the ~1,100-token household system prompt cold with each, then alternates between the
two for what every turn pays: evaluating ~20 new tokens (a request and the chat
template) after the long context, and decoding one token.

    python bench/attention_bench.py [--context 1200] [--new 20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from jarvis.config import load_settings
from jarvis.evaluation.dialogues import home_system_prompt


def timed(llm: Any, tokens: list[int], keep: int) -> float:
    """Seconds to evaluate ``tokens`` on top of the first ``keep`` live tokens."""
    llm.n_tokens = keep
    llm._ctx.kv_cache_seq_rm(0, keep, -1)
    t = time.perf_counter()
    llm.eval(tokens)
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=1200, help="tokens already in the context")
    p.add_argument("--new", type=int, default=20, help="tokens evaluated per turn")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    import llama_cpp

    s = load_settings().llm
    llms = {flash: llama_cpp.Llama(model_path=str(s.model_path), n_ctx=s.context_window,
                                   n_threads=s.n_threads, n_threads_batch=s.n_threads_batch,
                                   n_batch=s.n_batch, n_ubatch=s.n_ubatch, flash_attn=flash,
                                   verbose=False)
            for flash in (True, False)}
    text = home_system_prompt()
    tokens: list[int] = []
    while len(tokens) < args.context + args.new + 1:
        tokens += llms[True].tokenize(text.encode(), add_bos=not tokens)
    context, new = tokens[: args.context], tokens[args.context: args.context + args.new]
    one = tokens[args.context + args.new: args.context + args.new + 1]
    cold = {flash: timed(llm, context, 0) for flash, llm in llms.items()}
    turn: dict[bool, list[float]] = {True: [], False: []}
    decode: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for flash, llm in llms.items():  # alternate, so drift hits both alike
            turn[flash].append(timed(llm, new, args.context))
            decode[flash].append(timed(llm, one, args.context + args.new))
    print(f"{args.context}-token context, {args.new} new tokens, {args.repeats} repeats, "
          f"{s.n_threads} threads; median ms")
    print(f"{'flash attention':<16} {'cold prompt':>12} {'turn eval':>10} {'decode 1':>9}")
    for flash in (True, False):
        print(f"{'on' if flash else 'off':<16} {cold[flash] * 1000:>12.0f} "
              f"{statistics.median(turn[flash]) * 1000:>10.1f} "
              f"{statistics.median(decode[flash]) * 1000:>9.1f}")
    ratio = statistics.median(turn[True]) / statistics.median(turn[False])
    print(f"turn evaluation with flash attention takes {ratio:.2f}x the time without")
    for llm in llms.values():
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
