"""Loading a GGUF into llama.cpp: the ``llama_cpp.Llama`` itself (with llama.cpp's log
captured so a failure says why), what became of ``JARVIS_N_GPU_LAYERS``, the chat
template, and the fingerprint that keys the context cache to this exact setup."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from jarvis.config import LlmSettings
from jarvis.errors import ModelError
from jarvis.llm.cache import file_identity, fingerprint

log = logging.getLogger(__name__)

_KV_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}  # GGML_TYPE_*
_HOLDER_CTX = 64
"""``llama_cpp.Llama`` always makes a context; ours holds the model, tokenizer and
metadata only, so its context is as small as can be, and freed at once."""
_KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
_MEMORY_SHARE = 0.8
"""The KV cache may take at most this share of the memory available at load."""
_OFFLOAD_RE = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The template used when the GGUF has none."""


@dataclass(frozen=True)
class LoadedModel:
    """A constructed model and the facts read while loading it."""

    llm: Any
    """The ``llama_cpp.Llama``."""
    lib: Any
    """The ``llama_cpp`` module (its low-level API works on ``llm.ctx``)."""
    offload: str
    """What ``JARVIS_N_GPU_LAYERS`` did, in words."""
    template: str
    """The Jinja chat template: the GGUF's own, or :data:`CHATML`."""
    template_source: str
    """Where :attr:`template` came from, for reports."""


def load_model(settings: LlmSettings) -> LoadedModel:
    """Construct the model; :class:`~jarvis.errors.ModelError` when llama.cpp cannot."""
    import llama_cpp

    captured: list[str] = []
    llm = _construct(llama_cpp, settings, captured)
    offload = _describe_offload(llama_cpp, settings.n_gpu_layers, captured)
    template, source = _chat_template(llm, settings)
    return LoadedModel(llm, llama_cpp, offload, template, source)


@dataclass
class Context:
    """The llama.cpp context the engine serves from: ``n_seq`` sequences, each in its
    own KV stream of ``window`` tokens."""

    ctx: Any
    n_seq: int
    window: int
    _owner: Any

    def close(self) -> None:
        self._owner.close()


def create_context(model: LoadedModel, s: LlmSettings) -> Context:
    """A context for ``JARVIS_PARALLEL`` sequences of ``JARVIS_MODEL_CONTEXT_WINDOW``
    tokens each, not unified (a sequence attends only to its own cells);
    :class:`~jarvis.errors.ModelError` with the limit when it cannot be made."""
    from llama_cpp import _internals

    lib = model.lib
    limit = int(lib.llama_max_parallel_sequences())
    if s.parallel > limit:
        raise ModelError(f"JARVIS_PARALLEL={s.parallel} is invalid: this llama.cpp allows "
                         f"at most {limit} sequences")
    _check_kv_memory(model, s)
    params = lib.llama_context_params.from_buffer_copy(model.llm.context_params)
    params.n_ctx = s.context_window * s.parallel
    params.n_batch = max(s.n_batch, s.parallel)
    params.n_ubatch = s.n_ubatch
    params.n_seq_max = s.parallel
    params.kv_unified = False
    try:
        owner = _internals.LlamaContext(model=model.llm._model, params=params, verbose=False)
    except ValueError as exc:
        raise ModelError(
            f"llama.cpp could not create a context for JARVIS_PARALLEL={s.parallel} "
            f"sequences of JARVIS_MODEL_CONTEXT_WINDOW={s.context_window} tokens ({exc}): "
            "lower either"
        ) from exc
    window = int(lib.llama_n_ctx_seq(owner.ctx))
    return Context(owner.ctx, s.parallel, window, owner)


def kv_bytes_per_token(model: LoadedModel, kv_cache_type: str) -> float:
    """Bytes of K and V one token takes in one sequence's KV cache."""
    lib, m = model.lib, model.llm._model.model
    n_layer, n_head = lib.llama_model_n_layer(m), max(1, lib.llama_model_n_head(m))
    head_dim = lib.llama_model_n_embd(m) / n_head
    return float(2 * n_layer * lib.llama_model_n_head_kv(m) * head_dim
                 * _KV_BYTES[kv_cache_type])


def _check_kv_memory(model: LoadedModel, s: LlmSettings) -> None:
    """Refuse, in one line naming the limit, a KV cache that would not fit in memory."""
    available = _available_memory()
    need = kv_bytes_per_token(model, s.kv_cache_type) * s.context_window * s.parallel
    if available is not None and need > _MEMORY_SHARE * available:
        raise ModelError(
            f"JARVIS_PARALLEL={s.parallel} sequences of JARVIS_MODEL_CONTEXT_WINDOW="
            f"{s.context_window} tokens need {need / (1 << 30):.1f} GiB of KV cache, more "
            f"than {_MEMORY_SHARE:.0%} of the {available / (1 << 30):.1f} GiB available: "
            "lower JARVIS_PARALLEL or the window (or set JARVIS_KV_CACHE_TYPE=q8_0)")


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cache_fingerprint(settings: LlmSettings, model: LoadedModel, window: int) -> str:
    """Everything a saved KV state depends on: a state from another model, context
    size (of one sequence: ``window``), KV type, attention kernel, template or llama.cpp
    version is never restored."""
    return fingerprint(
        model=file_identity(settings.model_path),
        n_ctx=window,
        kv=settings.kv_cache_type,
        flash_attn=settings.flash_attn,
        template=hashlib.sha256(model.template.encode()).hexdigest(),
        llama_cpp=model.lib.__version__,
    )


def _construct(llama_cpp: Any, s: LlmSettings, captured: list[str]) -> Any:
    """``llama_cpp.Llama`` with llama.cpp's log lines collected into ``captured``."""

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def capture(level: int, text: bytes, user_data: Any) -> None:
        captured.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        llm = llama_cpp.Llama(
            model_path=str(s.model_path),
            n_ctx=_HOLDER_CTX,
            n_threads=s.n_threads,
            n_threads_batch=s.n_threads_batch,
            n_batch=s.n_batch,
            n_ubatch=s.n_ubatch,
            n_gpu_layers=s.n_gpu_layers,
            flash_attn=s.flash_attn,
            type_k=_KV_TYPES[s.kv_cache_type],
            type_v=_KV_TYPES[s.kv_cache_type],
            use_mmap=s.use_mmap,
            use_mlock=s.use_mlock,
            seed=s.seed if s.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED,
            logits_all=False,
            verbose=False,
        )
        llm._ctx.close()  # the engine's context is created by create_context()
        return llm
    except (ValueError, RuntimeError, OSError) as exc:
        tail = " ".join(line.strip() for line in captured[-3:] if line.strip())
        raise ModelError(
            f"JARVIS_MODEL_PATH={s.model_path}: llama.cpp could not load it ({exc}"
            f"{'; ' + tail if tail else ''}). Check the file is a complete GGUF and that "
            "JARVIS_MODEL_CONTEXT_WINDOW fits in memory"
        ) from exc
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _describe_offload(llama_cpp: Any, requested: int, captured: list[str]) -> str:
    """Say plainly whether JARVIS_N_GPU_LAYERS did anything."""
    if not llama_cpp.llama_supports_gpu_offload():
        text = "CPU-only build"
        if requested != 0:
            text += f": JARVIS_N_GPU_LAYERS={requested} has no effect"
            log.info("JARVIS_N_GPU_LAYERS=%d has no effect: this llama-cpp-python build "
                     "has no GPU backend, all layers run on the CPU", requested)
        return text
    for line in captured:
        match = _OFFLOAD_RE.search(line)
        if match:
            done, total = int(match.group(1)), int(match.group(2))
            text = f"{done}/{total} layers offloaded to GPU"
            if requested != 0 and done == 0:
                log.warning("JARVIS_N_GPU_LAYERS=%d but no layer was offloaded", requested)
            return text
    return f"GPU build; JARVIS_N_GPU_LAYERS={requested} (llama.cpp did not report offload)"


def _chat_template(llm: Any, s: LlmSettings) -> tuple[str, str]:
    """The GGUF's chat template and ``"gguf"``, or ChatML and why."""
    template: str | None = llm.metadata.get("tokenizer.chat_template")
    if template:
        return template, "gguf"
    log.warning("%s has no chat template; using ChatML", s.model_path.name)
    return CHATML, "chatml fallback (the GGUF has no chat template)"
