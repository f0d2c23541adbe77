#!/usr/bin/env python3
"""What one decode step costs for 1, 2 and 4 sequences at once: the ceiling of what
continuous batching can gain with this model on this CPU.

A llama.cpp context with 4 sequences, each holding ``--context`` tokens of the same
text, then steps of one new token in each of N sequences (one ``llama_decode``),
median of ``--steps``; with the per-sequence KV streams Jarvis uses (``kv_unified``
off) and, for comparison, with one unified KV buffer. The ratio "N sequences / 1" is
what a step of N costs against a step of one: N means batching gains nothing, 1 means
the other sequences come free.

    python bench/batch_bench.py [--context 1200] [--steps 20] [--threads 2] [--flash-attn]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import llama_cpp

from jarvis.llm.batch import Batch
from jarvis.models import starter_llm_path


def measure(llm: Any, unified: bool, flash: bool, context: int, steps: int) -> list[float]:
    from llama_cpp import _internals

    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_ctx, params.n_batch, params.n_ubatch = 4 * (context + 512), 512, 512
    params.n_seq_max, params.kv_unified = 4, unified
    if flash:
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    owner: Any = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    ctx, batch = owner.ctx, Batch(llama_cpp, 512)
    text = b"The kitchen light, the hall heating and the garden sprinkler. " * 200
    tokens = llm.tokenize(text)[:context]
    for seq in range(4):
        for start in range(0, len(tokens), 512):
            batch.clear()
            for i, token in enumerate(tokens[start:start + 512]):
                batch.add(token, start + i, seq, False)
            batch.decode(ctx)
    positions = [len(tokens)] * 4
    medians = []
    for n in (1, 2, 4):
        times = []
        for _ in range(steps):
            batch.clear()
            for seq in range(n):
                batch.add(42, positions[seq], seq, True)
                positions[seq] += 1
            t = time.perf_counter()
            batch.decode(ctx)
            times.append(time.perf_counter() - t)
        medians.append(statistics.median(times))
    batch.close()
    owner.close()
    return medians


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=1200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--flash-attn", action="store_true")
    args = p.parse_args()
    model = starter_llm_path()
    if model is None:
        raise SystemExit("batch_bench: the starter model is not installed (make setup)")
    llm = llama_cpp.Llama(str(model), n_ctx=64, n_batch=64,
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    print(f"{model.name}, {args.threads} threads, {args.context} tokens per "
          f"sequence, flash attention {'on' if args.flash_attn else 'off'}")
    print(f"{'KV cache':<22} {'1 seq':>8} {'2 seqs':>8} {'4 seqs':>8} {'4/1':>6} "
          f"{'tokens/s at 4 vs 1':>20}")
    for unified in (False, True):
        one, two, four = measure(llm, unified, args.flash_attn, args.context, args.steps)
        name = "unified" if unified else "per sequence (Jarvis)"
        print(f"{name:<22} {one * 1000:>6.1f}ms {two * 1000:>6.1f}ms {four * 1000:>6.1f}ms "
              f"{four / one:>6.2f} {4 / four:>9.0f} vs {1 / one:.0f} ({one * 4 / four:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
