"""Audio files in and out: read any WAV/FLAC (any rate, any channel count) as mono
float32 at the rate you ask for, write 16-bit WAV, and stream a file as if it were a
microphone.

Every failure is an :class:`~jarvis.audio.errors.AudioError` naming the file, the
problem and the fix. libsndfile reads a truncated WAV without complaint, so WAV and
RF64 headers are checked against the file size first.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from jarvis.audio.errors import AudioError, AudioFormatError
from jarvis.audio.formats import ASR_RATE, Audio, FloatArray, to_int16, to_mono
from jarvis.audio.resample import Resampler, resample

READABLE = "WAV, FLAC, OGG (Vorbis/Opus), MP3 and AIFF"


def _soundfile() -> Any:
    import soundfile

    return soundfile


def _convert_hint(path: Path) -> str:
    return f"convert it with: ffmpeg -i '{path}' -ar 16000 -ac 1 '{path.with_suffix('.wav').name}'"


def _unreadable(path: Path, exc: Exception) -> AudioFormatError:
    """libsndfile's complaint about ``path`` as a message that says what to do."""
    problem = str(getattr(exc, "error_string", "") or exc)
    return AudioFormatError(
        f"{path}: not a readable sound file ({problem}); Jarvis reads {READABLE}; "
        + _convert_hint(path)
    )


def check_wav_header(path: Path) -> None:
    """Raise AudioFormatError if a RIFF/RF64 WAV file is cut short.

    A ``data`` chunk whose declared size runs past the end of the file means the file
    was truncated (a copy or a recording that stopped early). A declared size of 0 or
    0xFFFFFFFF is the convention of streamed WAVs and is accepted. Non-WAV files are
    left to libsndfile.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
                return
            data64: int | None = None
            offset = 12
            while offset + 8 <= size:
                f.seek(offset)
                chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
                if chunk_id == b"ds64" and chunk_size >= 16:
                    _riff64, data64 = struct.unpack("<QQ", f.read(16))
                if chunk_id == b"data":
                    declared = data64 if (chunk_size == 0xFFFFFFFF and data64) else chunk_size
                    available = size - (offset + 8)
                    if declared not in (0, 0xFFFFFFFF) and declared > available:
                        raise AudioFormatError(
                            f"{path}: truncated WAV: the header declares {declared} bytes of "
                            f"audio but only {available} follow (the file was cut short "
                            "while copying or recording); re-export or re-record it"
                        )
                    return
                offset += 8 + chunk_size + (chunk_size & 1)
    except OSError as exc:
        raise AudioError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def read_audio(path: str | Path, rate: int = ASR_RATE) -> Audio:
    """Read a sound file as mono float32 at ``rate`` Hz (channels averaged, resampled).

    Raises AudioError for a missing or unreadable file and AudioFormatError for a
    corrupt, truncated or unsupported one. A valid file with no samples gives an
    empty :class:`Audio`.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not a sound file")
    check_wav_header(path)
    sf = _soundfile()
    try:
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise _unreadable(path, exc) from None
    except (RuntimeError, ValueError, EOFError) as exc:  # decoders inside libsndfile
        raise AudioFormatError(f"{path}: corrupt audio data ({exc}); " + _convert_hint(path)) \
            from None
    except OSError as exc:
        raise AudioError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    mono = to_mono(data)
    if not np.all(np.isfinite(mono)):
        raise AudioFormatError(f"{path}: contains NaN or infinite samples; " + _convert_hint(path))
    return Audio(resample(mono, int(file_rate), rate), rate)


def write_wav(path: str | Path, samples: npt.ArrayLike, rate: int) -> Path:
    """Write mono samples (float in [-1, 1] or int16) as a 16-bit PCM WAV file."""
    path = Path(path)
    sf = _soundfile()
    pcm = to_int16(np.asarray(samples).reshape(-1))
    try:
        sf.write(str(path), pcm, rate, subtype="PCM_16", format="WAV")
    except (sf.LibsndfileError, OSError) as exc:
        raise AudioError(f"{path}: cannot write the WAV file ({exc})") from None
    return path


class WavSink:
    """Append mono chunks to a 16-bit WAV file as they arrive (a speaker for files).

    Use as a context manager; the header is finalised on close.
    """

    def __init__(self, path: str | Path, rate: int) -> None:
        self.path = Path(path)
        self.rate = rate
        self.frames = 0
        sf = _soundfile()
        try:
            self._file = sf.SoundFile(
                str(self.path), "w", samplerate=rate, channels=1, subtype="PCM_16", format="WAV"
            )
        except (sf.LibsndfileError, OSError) as exc:
            raise AudioError(f"{self.path}: cannot write the WAV file ({exc})") from None

    def write(self, samples: npt.ArrayLike) -> None:
        pcm = to_int16(np.asarray(samples).reshape(-1))
        self._file.write(pcm)
        self.frames += len(pcm)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> WavSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def iter_file_chunks(
    path: str | Path, rate: int = ASR_RATE, chunk_s: float = 0.1
) -> Iterator[FloatArray]:
    """Mono float32 chunks of ``chunk_s`` seconds at ``rate``, read block by block
    (bounded memory for long files)."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    check_wav_header(path)
    sf = _soundfile()
    try:
        f = sf.SoundFile(str(path))
    except sf.LibsndfileError as exc:
        raise _unreadable(path, exc) from None
    with f:
        resampler = Resampler(int(f.samplerate), rate)
        block = max(1, int(f.samplerate * chunk_s))
        for data in f.blocks(blocksize=block, dtype="float32", always_2d=True):
            out = resampler.process(to_mono(data))
            if len(out):
                yield out
        tail = resampler.flush()
        if len(tail):
            yield tail


async def file_source(
    path: str | Path, rate: int = ASR_RATE, chunk_s: float = 0.1, realtime: bool = False
) -> AsyncIterator[FloatArray]:
    """A sound file as an async stream of chunks, like :class:`~jarvis.audio.Microphone`.

    Reading runs in a worker thread; with ``realtime`` the chunks are paced at the
    speed of the audio (for demos and latency tests).
    """
    iterator = iter_file_chunks(path, rate, chunk_s)
    sentinel: FloatArray = np.zeros(0, dtype=np.float32)
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    while True:
        chunk = await asyncio.to_thread(next, iterator, sentinel)
        if chunk is sentinel:
            return
        if realtime:
            due = start + sent / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        sent += len(chunk)
        yield chunk
