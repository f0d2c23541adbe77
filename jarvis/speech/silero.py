"""Silero VAD (the ONNX model faster-whisper ships, no download) scoring a live stream,
and :class:`Endpointer`, which cuts a 16 kHz stream into utterances with it.

The model scores 512-sample frames (32 ms at 16 kHz) and carries an LSTM state and
the previous frame's last 64 samples from call to call, so a stream scored frame by
frame gives the same probabilities as faster-whisper's batch call on the whole clip.
Onset lag, measured on the 24 piper commands of tests/data: the first frame at the
0.5 threshold comes a median 26 ms (worst 120 ms) after the first sound from a fresh
state, but a median 75 ms (p90 157 ms, worst 358 ms) two seconds after other speech.
The pre-roll must cover that lag. Resetting the state after each utterance brings the
lag back to the fresh numbers but lowers the scores of weak speech (Kennedy's "ask
not" was then missed), so the state is kept.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jarvis.audio.formats import ASR_RATE, FloatArray, to_float32
from jarvis.config import VadSettings
from jarvis.errors import ModelError
from jarvis.speech.vad import Segmenter, SegmenterConfig, VadEvent

FRAME = 512
"""Samples per scored frame at 16 kHz."""
_CONTEXT = 64


def silero_model_path() -> Path:
    """The Silero VAD model inside the installed faster-whisper package."""
    from faster_whisper.vad import get_assets_path

    return Path(get_assets_path()) / "silero_vad_v6.onnx"


class SileroVad:
    """Stateful speech probability for consecutive 512-sample frames at 16 kHz."""

    def __init__(self, model_path: Path | None = None) -> None:
        import onnxruntime

        path = model_path or silero_model_path()
        if not path.is_file():
            raise ModelError(
                f"{path}: Silero VAD model not found; reinstall faster-whisper "
                "(pip install --force-reinstall faster-whisper==1.2.1)"
            )
        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        try:
            self._session: Any = onnxruntime.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelError(f"{path}: not a usable Silero VAD model ({exc})") from None
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Start a new stream."""
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)

    def score(self, frames: npt.ArrayLike) -> FloatArray:
        """Probabilities for ``len(frames) // 512`` consecutive frames (a whole
        number of frames is required)."""
        x = to_float32(frames).reshape(-1)
        if len(x) % FRAME:
            raise ValueError(f"expected a multiple of {FRAME} samples, got {len(x)}")
        count = len(x) // FRAME
        if count == 0:
            return np.zeros(0, dtype=np.float32)
        blocks = x.reshape(count, FRAME)
        with self._lock:
            contexts = np.vstack([self._context[None, :], blocks[:-1, -_CONTEXT:]])
            batch = np.ascontiguousarray(np.hstack([contexts, blocks]))
            out, self._h, self._c = self._session.run(
                None, {"input": batch, "h": self._h, "c": self._c}
            )
            self._context = blocks[-1, -_CONTEXT:].copy()
        return np.asarray(out, dtype=np.float32).reshape(-1)


class Endpointer:
    """Silero scoring + :class:`~jarvis.speech.vad.Segmenter` over a 16 kHz stream.

    ``process`` takes chunks of any length (they are re-framed into 512 samples) and
    is synchronous; ``segment`` runs it in a worker thread over an async stream.
    """

    def __init__(
        self, vad: VadSettings | SegmenterConfig, model: SileroVad | None = None
    ) -> None:
        config = vad if isinstance(vad, SegmenterConfig) else SegmenterConfig.from_settings(vad)
        if config.sample_rate != ASR_RATE:
            raise ValueError("Silero VAD runs at 16 kHz")
        self.model = model or SileroVad()
        self.segmenter = Segmenter(config)
        self._pending: FloatArray = np.zeros(0, dtype=np.float32)

    def reset(self) -> None:
        self.model.reset()
        self.segmenter.reset()
        self._pending = np.zeros(0, dtype=np.float32)

    def process(self, chunk: npt.ArrayLike) -> list[VadEvent]:
        x = to_float32(chunk).reshape(-1)
        data = np.concatenate([self._pending, x]) if len(self._pending) else x
        whole = len(data) // FRAME * FRAME
        self._pending = data[whole:].copy()
        if not whole:
            return []
        probs = self.model.score(data[:whole])
        events: list[VadEvent] = []
        for i, p in enumerate(probs):
            events += self.segmenter.push(data[i * FRAME:(i + 1) * FRAME], float(p))
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: score the last partial frame (zero-padded), then flush."""
        events: list[VadEvent] = []
        rest, self._pending = self._pending, np.zeros(0, dtype=np.float32)
        if len(rest):
            padded = np.concatenate([rest, np.zeros(FRAME - len(rest), dtype=np.float32)])
            p = float(self.model.score(padded)[0])
            events += self.segmenter.push(rest, p)
        events += self.segmenter.flush()
        self.model.reset()
        return events

    def segment_all(self, audio: npt.ArrayLike) -> list[VadEvent]:
        """Every event for a whole clip (a fresh stream)."""
        self.reset()
        return self.process(audio) + self.flush()

    async def segment(self, chunks: AsyncIterable[npt.ArrayLike]) -> AsyncIterator[VadEvent]:
        """Events as the stream arrives; the model runs off the event loop."""
        async for chunk in chunks:
            for event in await asyncio.to_thread(self.process, chunk):
                yield event
        for event in await asyncio.to_thread(self.flush):
            yield event
