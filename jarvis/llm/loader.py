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


def cache_fingerprint(settings: LlmSettings, model: LoadedModel) -> str:
    """Everything a saved KV state depends on: a state from another model, context
    size, KV type, attention kernel, template or llama.cpp version is never restored."""
    return fingerprint(
        model=file_identity(settings.model_path),
        n_ctx=model.llm.n_ctx(),
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
        return llama_cpp.Llama(
            model_path=str(s.model_path),
            n_ctx=s.context_window,
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
