"""A piper (VITS) voice whose waveform decoder runs in pieces, so the first audio of a
sentence is ready long before the whole sentence is.

A piper ``.onnx`` is one graph: text encoder, duration predictor and flow produce a
latent sequence ``z`` (one frame per ``hop_length`` = 256 samples), and a HiFi-GAN
decoder turns ``z`` into samples; the decoder costs most and grows with the audio
length. At load time the graph is cut in two at the decoder's input (with the
``onnx`` package): the first part runs once per sentence, the decoder then runs on
windows of ``z``, each with 16 frames of context on both sides, which reproduces the
one-pass waveform to within 4e-6 (the decoder's receptive field is shorter). The first
window is short (32 frames, 0.37 s) for a fast start, later ones longer (128 frames).

Measured on the 2-core test machine for "Okay, the kitchen lights are on now.": the
whole sentence takes 188 ms; the first part 64 ms plus the first window 31 ms.

If the graph cannot be cut (``onnx`` missing, a multi-speaker voice, another export
layout) the voice runs whole sentences as piper does. Unlike ``PiperVoice.synthesize``
the audio is not peak-normalised per sentence (a piece cannot know the sentence's
peak): the model's own level is kept.

Memory: onnxruntime's CPU arena never hands memory back by itself, so each new longest
sentence grew it for good (a 115-character sentence decoded whole needs about 200 MiB).
So: memory patterns are off (planned blocks, one per input shape, kept the arena
creeping up; per-tensor allocations reuse it); the decoder's windows are bounded, so
the arena they need is taken at load (one window of zeros) and kept; a call's last
encoder run and its last whole-sentence decoder run ask the arena to shrink (run option
``memory.enable_memory_arena_shrinkage``; after a whole-sentence run the windows' arena
is taken again), and then the C heap's free memory goes back to the OS (glibc
``malloc_trim``; the freed chunks fall below malloc's mmap threshold and would stay in
the heap otherwise). Measured over 50 sentences of 20-200 characters (RSS after the
warm-up -> highest): streamed 230 -> 339 MiB before (still creeping at 150 sentences),
256 -> 260 MiB now at the same CPU time; whole sentences 247 -> 460 MiB before, about
260 MiB throughout now, at a third more CPU time (page faults of the memory taken back,
and the windows' arena taken again; only benches and the demo synthesise whole
sentences, to make input speech). Turning the arena off fragments the heap instead
(worse), shrinking without the trim grows too, and shrinking the windows' arena after
every streamed sentence costs 4 % CPU time for 30 MiB.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jarvis.audio.formats import Int16Array, to_int16
from jarvis.errors import ModelError
from jarvis.heap import trim_heap

log = logging.getLogger(__name__)

FIRST_FRAMES = 32
"""Latent frames in a sentence's first decoder window (32 x 256 samples = 0.37 s)."""
NEXT_FRAMES = 128
CONTEXT_FRAMES = 16
"""Frames of ``z`` decoded on each side of a window and thrown away."""
_INPUTS = ("input", "input_lengths", "scales")
SHRINK_ARENA = "memory.enable_memory_arena_shrinkage"
"""onnxruntime run option: after this run, free the CPU arena's unused chunks."""


class ChunkedVoice:
    """Phonemise with espeak, run the encoder once per sentence, decode in windows."""

    def __init__(
        self, model_path: Path, *, length_scale: float = 1.0, deterministic: bool = False,
        threads: int = 0,
    ) -> None:
        from piper import PiperVoice
        from piper.config import PiperConfig

        config_path = Path(f"{model_path}.json")
        if not config_path.is_file():
            raise ModelError(
                f"{model_path}: its config {config_path.name} is missing; piper voices come "
                "as a .onnx and a .onnx.json pair"
            )
        try:
            config = PiperConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{config_path}: not a valid piper voice config ({exc})") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(
                f"{config_path}: not a piper voice config (missing or bad field {exc})"
            ) from None
        self.config = config
        self.sample_rate = int(config.sample_rate)
        self.hop = int(config.hop_length)
        noise = 0.0 if deterministic else config.noise_scale
        noise_w = 0.0 if deterministic else config.noise_w_scale
        self._scales = np.array([noise, length_scale * config.length_scale, noise_w],
                                dtype=np.float32)
        self._options = _session_options(threads)
        self._release = _release_options()
        self._encoder: Any = None
        self._decoder: Any = None
        self._z_name = ""
        self._full: Any = None
        self.streaming = self._load_split(model_path)
        if not self.streaming:
            self._full = self._session(str(model_path), model_path)
        # PiperVoice supplies espeak phonemisation and the id map; its own session is
        # only used by piper's synthesize(), which this class does not call.
        self._piper = PiperVoice(config=config, session=self._encoder or self._full)

    # ------------------------------------------------------------------ loading

    def _session(self, model: str | bytes, path: Path) -> Any:
        import onnxruntime

        try:
            return onnxruntime.InferenceSession(
                model, sess_options=self._options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # InvalidProtobuf, Fail, NoSuchFile ...
            raise ModelError(f"{path}: not a usable piper voice model ({exc})") from None

    def _load_split(self, path: Path) -> bool:
        """Cut the graph at the decoder input; False (whole-sentence mode) if it cannot."""
        if self.config.num_speakers > 1:
            return False
        try:
            import onnx  # type: ignore[import-not-found, unused-ignore]
            from onnx.utils import Extractor  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            log.warning("the onnx package is missing: piper runs whole sentences (slower "
                        "first audio); pip install onnx")
            return False
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # DecodeError for a file that is not ONNX
            raise ModelError(f"{path}: not a usable piper voice model ({exc})") from None
        graph = model.graph
        decoder = [n for n in graph.node if n.name.startswith("/dec/")]
        inputs = {i.name for i in graph.input}
        if not decoder or not set(_INPUTS) <= inputs or len(graph.output) != 1:
            log.info("%s: unfamiliar graph layout; piper runs whole sentences", path)
            return False
        z_name = decoder[0].input[0]
        try:
            extractor = Extractor(model)
            encoder = extractor.extract_model(list(_INPUTS), [z_name])
            vocoder = extractor.extract_model([z_name], [graph.output[0].name])
        except Exception as exc:  # the cut does not separate the graph
            log.info("%s: cannot split the decoder off (%s); whole sentences", path, exc)
            return False
        self._encoder = self._session(encoder.SerializeToString(), path)
        self._decoder = self._session(vocoder.SerializeToString(), path)
        self._z_name = z_name
        self._hold_windows()
        return True

    # ------------------------------------------------------------------ synthesis

    def audio_parts(self, text: str, *, windows: bool = True) -> Iterator[Int16Array]:
        """int16 pieces of ``text``'s audio, in order, each as soon as it is decoded;
        with ``windows=False`` one piece per sentence (the fastest way to all of it).
        The last sentence's encoder run (and whole-sentence decoder run) hands the
        arena's memory back, and then the C heap's (see the module doc)."""
        sentences = [p for p in self._piper.phonemize(text) if p]
        for i, phonemes in enumerate(sentences):
            ids = np.array([self._piper.phonemes_to_ids(phonemes)], dtype=np.int64)
            feed: dict[str, np.ndarray] = {
                "input": ids, "input_lengths": np.array([ids.shape[1]], dtype=np.int64),
                "scales": self._scales}
            yield from self._sentence(feed, windows,
                                      self._release if i == len(sentences) - 1 else None)
        trim_heap()  # once the last piece is handed over

    def _sentence(self, feed: dict[str, np.ndarray], windows: bool,
                  release: Any) -> Iterator[Int16Array]:
        if not self.streaming:
            if self.config.num_speakers > 1:
                feed["sid"] = np.array([self.config.default_speaker_id], dtype=np.int64)
            yield to_int16(np.asarray(self._full.run(None, feed, release)[0]).reshape(-1))
            return
        z = np.asarray(self._encoder.run(None, feed, release)[0])
        if windows:
            yield from self._decode(z)
        else:
            whole = self._decoder.run(None, {self._z_name: z}, release)[0]
            if release is not None:
                self._hold_windows()  # the shrink freed the windows' arena too
            yield to_int16(np.asarray(whole).reshape(-1))

    def _hold_windows(self) -> None:
        """Decode one full-size window of zeros, so that the decoder holds the arena its
        windows need (a fixed working set, part of the loaded voice) from the start
        rather than from the first long reply."""
        channels = self._encoder.get_outputs()[0].shape[1]
        if isinstance(channels, int):
            z = np.zeros((1, channels, NEXT_FRAMES + 2 * CONTEXT_FRAMES), dtype=np.float32)
            self._decoder.run(None, {self._z_name: z})

    def _decode(self, z: np.ndarray) -> Iterator[Int16Array]:
        frames = z.shape[2]
        start, size = 0, FIRST_FRAMES
        while start < frames:
            end = min(frames, start + size)
            lo, hi = max(0, start - CONTEXT_FRAMES), min(frames, end + CONTEXT_FRAMES)
            window = np.ascontiguousarray(z[:, :, lo:hi])
            audio = np.asarray(self._decoder.run(None, {self._z_name: window})[0]).reshape(-1)
            yield to_int16(audio[(start - lo) * self.hop:(end - lo) * self.hop])
            start, size = end, NEXT_FRAMES


def _session_options(threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    # Spinning worker threads fight the LLM and ASR threads on a small CPU: measured
    # 175 -> 108 ms for a short sentence while another process was busy, no change idle.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # See the module doc: per-tensor allocations keep the arena from ratcheting up.
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    return options


def _release_options() -> Any:
    """Run options for a call's last run: shrink the CPU arena afterwards."""
    import onnxruntime

    options = onnxruntime.RunOptions()
    options.add_run_config_entry(SHRINK_ARENA, "cpu:0")
    return options
