"""A wake-word model on the microphone stream: microWakeWord (``pymicro-wakeword``) on
TensorFlow Lite, a few milliseconds of CPU per second of audio.

:class:`WakeWordDetector` takes 16 kHz float32 chunks of any length and returns a
:class:`WakeDetection` when the model hears its phrase ("Hey Jarvis" for
``hey_jarvis``). The models come inside the ``pymicro-wakeword`` wheel
(:data:`BUNDLED_WAKE_WORDS`); nothing is downloaded.

How it runs: the audio is converted to int16 and cut into 10 ms blocks (160 samples;
a partial block waits for the next chunk), the microfrontend turns each block into
one 40-bin feature vector (the first after 30 ms), and every ``stride`` (3) vectors
the streaming model gives one probability, i.e. one every 30 ms. A detection is the
mean of the last ``sliding_window_size`` probabilities (from the model's JSON, 5 for
``hey_jarvis``) above its ``probability_cutoff`` (0.97). Because blocks are cut from
the stream and not from the chunks, the detections and their positions do not depend
on how the stream is chunked.

No double firing. The model keeps the wake word in its internal state for about half
a second after the phrase ends, so the windowed probability stays above the cut-off
for a run of outputs. After a detection the detector is *disarmed* until a full
window has fallen back to the cut-off or below (the same utterance cannot fire
twice), and a run of high outputs that starts within ``refractory_s`` of a detection
is ignored as a whole (it does not fire late, when the period ends).
:meth:`WakeWordDetector.rearm` clears the window and disarms the same way, without
reloading the model: measured, ``MicroWakeWord.reset`` (which reloads the model to
clear its internal state) costs 0.4 ms, but clearing the probability window alone
lets the same "Hey Jarvis" fire again every 150 ms while that state is still hot.

Importing this module does not import ``pymicro_wakeword`` (nor load TensorFlow
Lite): that happens when a detector is built.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from jarvis.audio.formats import ASR_RATE, Int16Array, to_int16
from jarvis.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from pymicro_wakeword import MicroWakeWord, MicroWakeWordFeatures

__all__ = ["BUNDLED_WAKE_WORDS", "WakeDetection", "WakeWordDetector", "is_bundled"]

BLOCK = 160
"""Samples per feature vector (10 ms at 16 kHz)."""
_INSTALL = "pip install pymicro-wakeword==2.5.0 (make setup installs it)"


def _package_dir() -> Path | None:
    """Where ``pymicro_wakeword`` is installed, found without importing it."""
    try:
        spec = importlib.util.find_spec("pymicro_wakeword")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _bundled() -> tuple[str, ...]:
    package = _package_dir()
    if package is None:
        return ()
    models = package / "models"
    return tuple(sorted(p.stem for p in models.glob("*.json")
                        if p.with_suffix(".tflite").is_file()))


BUNDLED_WAKE_WORDS: tuple[str, ...] = _bundled()
"""The wake-word models shipped in the ``pymicro-wakeword`` wheel, sorted (``alexa``,
``hey_jarvis``, ``hey_mycroft``, ``okay_nabu`` in 2.5.0); empty if it is not installed."""


def is_bundled(name: str) -> bool:
    """Whether ``name`` (case and surrounding spaces ignored) is a bundled model."""
    return _normalize(name) in BUNDLED_WAKE_WORDS


def _normalize(name: str) -> str:
    return name.strip().lower()


@dataclass(frozen=True)
class WakeDetection:
    """The wake word was heard."""

    name: str
    """The model's name, e.g. ``hey_jarvis``."""
    phrase: str
    """What it listens for, e.g. ``Hey Jarvis`` (from the model's JSON)."""
    sample: int
    """Stream position (16 kHz samples since the start or the last :meth:`reset`) at the
    end of the 10 ms block whose model output fired: a little after the end of the
    phrase, independent of the chunking."""
    probability: float
    """The windowed probability that crossed the cut-off."""

    @property
    def time_s(self) -> float:
        """:attr:`sample` in seconds."""
        return self.sample / ASR_RATE


class WakeWordDetector:
    """One bundled microWakeWord model listening to one 16 kHz stream.

    Not thread-safe: feed it from one thread (or one task at a time).
    """

    def __init__(self, name: str, *, refractory_s: float = 1.0,
                 cutoff: float | None = None) -> None:
        """Load the model ``name`` (one of :data:`BUNDLED_WAKE_WORDS`).

        ``cutoff``: the windowed probability a detection must exceed, in (0, 1); None
        takes the model's own ``probability_cutoff`` (0.97 for ``hey_jarvis``). A lower
        one hears more voices and is fooled more often (see bench/wakeword_bench.py).

        Raises :class:`~jarvis.errors.ConfigError` for a name that is not a bundled
        model, :class:`~jarvis.errors.ModelError` when ``pymicro-wakeword`` or its
        TensorFlow Lite library cannot be loaded.
        """
        if refractory_s < 0:
            raise ValueError(f"refractory_s must be >= 0, got {refractory_s}")
        if cutoff is not None and not 0.0 < cutoff < 1.0:  # NaN fails too
            raise ValueError(f"cutoff must be between 0 and 1 (exclusive), got {cutoff}")
        package = _package_dir()
        if package is None or not BUNDLED_WAKE_WORDS:
            raise ModelError(f"the wake-word model needs the pymicro-wakeword package: {_INSTALL}")
        key = _normalize(name)
        if key not in BUNDLED_WAKE_WORDS:
            raise ConfigError(
                f"JARVIS_WAKE_WORD={name}: no such wake-word model; bundled: "
                f"{', '.join(BUNDLED_WAKE_WORDS)} (any other text is matched on transcripts)"
            )
        config_path = package / "models" / f"{key}.json"
        try:
            config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
            micro = config["micro"]
            self.phrase: str = str(config["wake_word"])
            self.cutoff = (float(micro["probability_cutoff"]) if cutoff is None
                           else float(cutoff))
            self.window_size = max(1, int(micro["sliding_window_size"]))
            model_file = package / "models" / str(config["model"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{config_path}: not a usable microWakeWord config ({exc}); "
                             f"reinstall: {_INSTALL}") from None
        self.name: str = key
        self.refractory_samples = round(refractory_s * ASR_RATE)
        self._model, self._features = _load(key, self.phrase, model_file, self.cutoff, package)
        self.stride = max(1, int(self._model.stride))
        self._window: deque[float] = deque(maxlen=self.window_size)
        self._carry: Int16Array = np.zeros(0, dtype=np.int16)
        self._vectors = 0
        self._consumed = 0
        self.position: int = 0
        """Samples pushed since the start or the last :meth:`reset`."""
        self._armed = True
        self._quiet_until = 0

    # ------------------------------------------------------------------ stream

    def process(self, chunk: npt.ArrayLike) -> WakeDetection | None:
        """Feed the next chunk (16 kHz mono, float32 in [-1, 1] or int16, any length);
        the first detection in it, or None. Only a chunk longer than ``refractory_s``
        can hold two: :meth:`detections` returns them all."""
        found = self.detections(chunk)
        return found[0] if found else None

    def detections(self, chunk: npt.ArrayLike) -> list[WakeDetection]:
        """Feed the next chunk; every detection in it, in order (usually none)."""
        samples = to_int16(np.asarray(chunk).reshape(-1))
        self.position += len(samples)
        data = np.concatenate([self._carry, samples]) if len(self._carry) else samples
        whole = len(data) // BLOCK * BLOCK
        self._carry = data[whole:].copy()
        found: list[WakeDetection] = []
        for start in range(0, whole, BLOCK):
            detection = self._block(data[start:start + BLOCK].tobytes())
            if detection is not None:
                found.append(detection)
        return found

    def _block(self, block: bytes) -> WakeDetection | None:
        self._consumed += BLOCK
        detection = None
        for vector in self._features.process_streaming(block):
            self._vectors += 1
            probability = self._model.process_streaming_prob(vector)
            if self._vectors % self.stride or probability is None:
                continue  # no inference ran for this vector
            detection = self._output(probability) or detection
        return detection

    def _output(self, probability: float) -> WakeDetection | None:
        """One model output (the model's own window is 1: the window is kept here)."""
        self._window.append(probability)
        if len(self._window) < self.window_size:
            return None
        mean = sum(self._window) / self.window_size
        if mean <= self.cutoff:
            self._armed = True
            return None
        if not self._armed:
            return None
        self._armed = False  # this run of high outputs fires at most once ...
        if self._consumed < self._quiet_until:
            return None  # ... and not at all if it starts within the refractory period
        self._quiet_until = self._consumed + self.refractory_samples
        return WakeDetection(self.name, self.phrase, self._consumed, mean)

    # ------------------------------------------------------------------ control

    def rearm(self) -> None:
        """A detection was consumed: clear the probability window, and fire again only
        after a full window has been at or below the cut-off, so what is left of the
        same utterance (in the window or the model's state) cannot fire twice. The
        refractory period keeps running. Does not reload the model."""
        self._window.clear()
        self._armed = False

    def reset(self) -> None:
        """A new stream: position back to 0, model state, window and carry cleared."""
        self._model.reset()  # reloads the model (0.4 ms): the only way to clear its state
        self._features.reset()
        self._window.clear()
        self._carry = np.zeros(0, dtype=np.int16)
        self._vectors = 0
        self._consumed = 0
        self.position = 0
        self._armed = True
        self._quiet_until = 0

    def close(self) -> None:
        """Free the TensorFlow Lite interpreter (also done when collected)."""
        self._model.close()

    def __repr__(self) -> str:
        return f"WakeWordDetector({self.name!r}, position={self.position})"


def _load(name: str, phrase: str, model_file: Path, cutoff: float,
          package: Path) -> tuple[MicroWakeWord, MicroWakeWordFeatures]:
    """The model with a window of 1 (raw outputs; the detector keeps the window) and a
    feature frontend."""
    try:
        from pymicro_wakeword import MicroWakeWord, MicroWakeWordFeatures
    except ImportError as exc:
        raise ModelError(f"pymicro-wakeword cannot be imported ({exc}); {_INSTALL}") from None
    library = next(iter(sorted((package / "lib").glob("*tensorflowlite_c.*"))), None)
    if library is None:
        raise ModelError(
            f"{package / 'lib'}: the TensorFlow Lite library (libtensorflowlite_c) is "
            f"missing from pymicro-wakeword; reinstall it: pip install --force-reinstall "
            f"pymicro-wakeword==2.5.0")
    try:
        # Loaded here first: MicroWakeWord's own failure leaves an object whose __del__
        # raises too ("Exception ignored in ..." on stderr).
        ctypes.CDLL(str(library), mode=getattr(os, "RTLD_GLOBAL", 0))
    except OSError as exc:  # wrong platform, a truncated file, a missing libc++
        raise ModelError(
            f"{library}: the TensorFlow Lite library cannot be loaded ({exc}); reinstall "
            f"pymicro-wakeword for this platform: pip install --force-reinstall "
            f"pymicro-wakeword==2.5.0 (wheels for Linux x86_64/aarch64/armv7l and macOS)"
        ) from None
    try:
        model = MicroWakeWord(
            name, wake_word=phrase, tflite_model=model_file, probability_cutoff=cutoff,
            sliding_window_size=1, trained_languages=[],
            libtensorflowlite_c_path=library)
    except (OSError, RuntimeError, ValueError) as exc:  # NULL interpreter, bad tensor type
        raise ModelError(f"{model_file}: not a usable microWakeWord model ({exc})") from None
    return model, MicroWakeWordFeatures()
