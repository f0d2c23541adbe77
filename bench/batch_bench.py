#!/usr/bin/env python3
"""What one decode step costs for 1, 2 and 4 sequences at once: the ceiling of what
continuous batching can gain with this model on this CPU.

A llama.cpp context with 4 sequences, each holding ``--context`` tokens of the same
text, then steps of one new token in each of N sequences (one ``llama_decode``),
median of ``--steps``; with the per-sequence KV streams Jarvis uses (``kv_unified``
off) and, for comparison, with one unified KV buffer. The ratio "N sequences / 1" is
what a step of N costs against a step of one: N means batching gains nothing, 1 means
the other sequences come free.

``--model`` (repeatable) measures other GGUF files in the same run, e.g. the starter
model requantized with ``--requantize q4_0,iq4_nl,q8_0,f16`` (written once under
``~/.cache/jarvis-bench/quant``): whether another weight format has a batched CPU
kernel that makes a step of 4 cheaper than 4 steps of one.

    python bench/batch_bench.py [--context 1200] [--steps 20] [--threads 2] [--flash-attn]
                                [--model FILE ...] [--requantize TYPES] [--per-sequence-only]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path
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


QUANT_DIR = Path("~/.cache/jarvis-bench/quant").expanduser()


def requantized(source: Path, name: str) -> Path:
    """``source`` requantized to ``name`` (a llama.cpp file type such as q4_0), made once."""
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}", None)
    if ftype is None:
        raise SystemExit(f"batch_bench: --requantize {name}: llama.cpp has no such file type")
    target = QUANT_DIR / f"{source.stem}.{name}.gguf"
    if not target.exists():
        QUANT_DIR.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, 2
        partial = target.with_suffix(".part")
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(),
                                          ctypes.byref(params)) != 0:
            raise SystemExit(f"batch_bench: requantizing {source.name} to {name} failed")
        partial.rename(target)
    return target


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=1200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--flash-attn", action="store_true")
    p.add_argument("--model", type=Path, action="append", default=[],
                   help="a GGUF file to measure (repeatable; default: the starter model)")
    p.add_argument("--requantize", default="",
                   help="also measure the first model requantized to these types, e.g. q4_0,f16")
    p.add_argument("--per-sequence-only", action="store_true",
                   help="skip the unified KV buffer row")
    args = p.parse_args()
    models = list(args.model)
    if not models:
        starter = starter_llm_path()
        if starter is None:
            raise SystemExit("batch_bench: the starter model is not installed (make setup)")
        models.append(starter)
    for model in models:
        if not model.is_file():
            raise SystemExit(f"batch_bench: --model {model}: no such file")
    models += [requantized(models[0], name.strip())
               for name in args.requantize.split(",") if name.strip()]
    print(f"{args.threads} threads, {args.context} tokens per sequence, "
          f"flash attention {'on' if args.flash_attn else 'off'}")
    print(f"{'model':<40} {'KV cache':<22} {'1 seq':>8} {'2 seqs':>8} {'4 seqs':>8} "
          f"{'4/1':>6} {'tokens/s at 4 vs 1':>20}")
    for model in models:
        llm = llama_cpp.Llama(str(model), n_ctx=64, n_batch=64, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
        for unified in (False,) if args.per_sequence_only else (False, True):
            one, two, four = measure(llm, unified, args.flash_attn, args.context, args.steps)
            kind = "unified" if unified else "per sequence (Jarvis)"
            print(f"{model.name[-40:]:<40} {kind:<22} {one * 1000:>6.1f}ms "
                  f"{two * 1000:>6.1f}ms {four * 1000:>6.1f}ms {four / one:>6.2f} "
                  f"{4 / four:>9.0f} vs {1 / one:.0f} ({one * 4 / four:.2f}x)", flush=True)
        llm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
