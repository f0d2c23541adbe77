"""Audio files in and out: read any WAV/FLAC (any rate, any channel count) as mono
float32 at the rate you ask for, write 16-bit WAV, and stream a file as if it were a
microphone.

Every failure is an :class:`~jarvis.audio.errors.AudioError` naming the file, the
problem and the fix. A file is untrusted input, so before anything is decoded:

- only a regular file is opened (a FIFO or a device would block or never end);
- a WAV/RF64 header is checked against itself and the file size (libsndfile reads a
  truncated WAV without complaint and believes any sample rate);
- the sample rate and channel count of every format must be possible
  (:func:`~jarvis.audio.formats.format_problem`): a header claiming 1 Hz would make
  the resampler produce 16,000 samples per input sample.

Files are decoded block by block, so memory follows the audio actually kept, and
:func:`read_audio` refuses a file longer than the caller's ``max_seconds`` before
reading it (or, when the header does not say, as soon as the limit is passed).
"""

from __future__ import annotations

import asyncio
import math
import os
import shlex
import stat
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from jarvis.audio.errors import AudioError, AudioFormatError
from jarvis.audio.formats import ASR_RATE, Audio, FloatArray, format_problem, to_int16, to_mono
from jarvis.audio.resample import Resampler

READABLE = "WAV, FLAC, OGG (Vorbis/Opus), MP3 and AIFF"

_BLOCK_BYTES = 4 << 20
"""Most decoded audio (float32, all channels) held per block while reading a file."""
_MAX_WAV_CHUNKS = 4096
"""WAV chunks inspected before the header check gives up (a crafted file can hold
millions of empty chunks; libsndfile then decides)."""
_SHOWN_CHARS = 160
"""A longer path is shown as its first and last 40 characters."""


def _soundfile() -> Any:
    import soundfile

    return soundfile


def _shown(path: Path) -> str:
    """``path`` for a one-line message: as it is when printable and not too long, else
    quoted with control characters escaped (and a long one cut to its first and last 40
    characters)."""
    text = str(path)
    if len(text) <= _SHOWN_CHARS and text.isprintable():
        return text
    if len(text) <= _SHOWN_CHARS:
        return repr(text)
    return f"{text[:40]!r}...{text[-40:]!r} ({len(text)} characters)"


def convert_command(path: Path, *, extra: str = "") -> str:
    """An ffmpeg command that turns ``path`` into a 16 kHz mono WAV in the current
    directory. The output is ``<name>-16k-mono.wav``, never the input itself (ffmpeg
    would overwrite the file it is reading)."""
    target = f"{path.stem}-16k-mono.wav"
    if len(str(path)) > _SHOWN_CHARS or not str(path).isprintable():
        return f"ffmpeg -i INPUT{extra} -ar 16000 -ac 1 converted-16k-mono.wav"
    return f"ffmpeg -i {shlex.quote(str(path))}{extra} -ar 16000 -ac 1 {shlex.quote(target)}"


def _convert_hint(path: Path) -> str:
    return f"convert it with: {convert_command(path)}"


def _unreadable(path: Path, exc: Exception) -> AudioFormatError:
    """libsndfile's complaint about ``path`` as a message that says what to do."""
    problem = str(getattr(exc, "error_string", "") or exc)
    return AudioFormatError(
        f"{_shown(path)}: not a readable sound file ({problem}); Jarvis reads {READABLE}; "
        + _convert_hint(path)
    )


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _check_regular(path: Path, mode: int) -> None:
    """AudioError unless ``mode`` is a regular file's."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise AudioError(f"{_shown(path)}: is a directory, not a sound file")
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise AudioError(
        f"{_shown(path)}: is {kind}, not a sound file; Jarvis reads regular files only (a "
        "pipe or device can block or never end): save the audio to a file first"
    )


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, refused unless it is a regular file. A FIFO is
    opened without blocking (no writer needed) and refused at once."""
    try:
        _check_regular(path, os.stat(path).st_mode)  # no open() at all for most non-files
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise AudioError(f"{_shown(path)}: no such file") from None
    except OSError as exc:
        raise AudioError(f"{_shown(path)}: cannot read the file ({exc.strerror or exc})") \
            from None
    try:
        _check_regular(path, os.fstat(fd).st_mode)  # the same file as the stat above
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def check_wav_header(path: Path) -> None:
    """Raise AudioError unless ``path`` is a regular file, and AudioFormatError if a
    RIFF/RF64 WAV header is impossible or does not match the file.

    Checked: the ``fmt`` chunk (at least 16 bytes; 1 to 256 channels; 8 to 192 kHz; for
    PCM and float, a frame size and byte rate that agree with the channels, sample
    width and rate) and the ``data`` chunk (a whole number of frames, and not more
    bytes than the file holds, which means the file was cut short). A declared data
    size of 0 or 0xFFFFFFFF is the convention of streamed WAVs and is accepted.
    Other formats are left to libsndfile (and :func:`format_problem`).
    """
    try:
        with _open_regular(path) as f:
            _check_wav(path, f, os.fstat(f.fileno()).st_size)
    except OSError as exc:
        raise AudioError(f"{_shown(path)}: cannot read the file ({exc.strerror or exc})") \
            from None


def _check_wav(path: Path, f: BinaryIO, size: int) -> None:
    head = f.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        return
    data64: int | None = None
    block_align = 0
    offset = 12
    for _ in range(_MAX_WAV_CHUNKS):
        if offset + 8 > size:
            return
        f.seek(offset)
        chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
        if chunk_id == b"ds64" and chunk_size >= 16:
            _riff64, data64 = struct.unpack("<QQ", f.read(16))
        elif chunk_id == b"fmt ":
            if offset + 8 + 16 > size:
                return  # the file ends inside its header: libsndfile says it cannot read it
            if chunk_size < 16:
                raise AudioFormatError(
                    f"{_shown(path)}: broken WAV header: its fmt chunk has {chunk_size} "
                    "bytes, at least 16 are needed; " + _convert_hint(path))
            block_align = _check_fmt(path, struct.unpack("<HHIIHH", f.read(16)))
        elif chunk_id == b"data":
            declared = data64 if (chunk_size == 0xFFFFFFFF and data64) else chunk_size
            available = size - (offset + 8)
            if declared in (0, 0xFFFFFFFF):
                return
            if declared > available:
                raise AudioFormatError(
                    f"{_shown(path)}: truncated WAV: the header declares {declared} bytes of "
                    f"audio but only {available} follow (the file was cut short "
                    "while copying or recording); re-export or re-record it"
                )
            if block_align and declared % block_align:
                raise AudioFormatError(
                    f"{_shown(path)}: broken WAV header: {declared} bytes of audio is not a "
                    f"whole number of {block_align}-byte frames; " + _convert_hint(path))
            return
        offset += 8 + chunk_size + (chunk_size & 1)


_PCM_TAGS = (1, 3, 0xFFFE)  # PCM, IEEE float, WAVE_FORMAT_EXTENSIBLE


def _check_fmt(path: Path, fmt: tuple[int, ...]) -> int:
    """Check a WAV ``fmt`` chunk; returns its frame size (0 when it does not apply)."""
    tag, channels, rate, byte_rate, block_align, bits = fmt
    problem = format_problem(rate, channels)
    if problem is not None:
        raise AudioFormatError(f"{_shown(path)}: unsupported WAV: {problem}; "
                               + _convert_hint(path))
    if tag in _PCM_TAGS:
        frame = channels * ((bits + 7) // 8)
        if bits == 0:
            problem = "the header says its samples have 0 bits"
        elif block_align != frame:
            problem = (f"the header's frame size is {block_align} bytes, but {channels} "
                       f"channel(s) of {bits}-bit samples take {frame}")
        elif byte_rate != rate * block_align:
            problem = (f"the header's byte rate is {byte_rate}, but {rate} Hz of "
                       f"{block_align}-byte frames is {rate * block_align}")
    if problem is not None:
        raise AudioFormatError(f"{_shown(path)}: broken WAV header: {problem}; "
                               + _convert_hint(path))
    return block_align if tag in _PCM_TAGS else 0


def _open_sound(path: Path) -> Any:
    """A ``soundfile.SoundFile`` for ``path`` whose format has been checked."""
    check_wav_header(path)
    sf = _soundfile()
    try:
        f = sf.SoundFile(str(path))
    except sf.LibsndfileError as exc:
        raise _unreadable(path, exc) from None
    except OSError as exc:
        raise AudioError(f"{_shown(path)}: cannot read the file ({exc.strerror or exc})") \
            from None
    problem = format_problem(int(f.samplerate), int(f.channels))
    if problem is not None:
        f.close()
        raise AudioFormatError(f"{_shown(path)}: unsupported sound file: {problem}; "
                               + _convert_hint(path))
    return f


def _block_frames(rate: int, channels: int, seconds: float) -> int:
    """Frames per block: ``seconds`` of audio, but at most :data:`_BLOCK_BYTES` of it."""
    return max(1, min(int(rate * seconds), _BLOCK_BYTES // (4 * channels)))


def _known_frames(f: Any) -> int | None:
    """The frame count the file's header states, if it states one."""
    frames = int(f.frames)
    return frames if 0 <= frames < (1 << 62) else None  # SF_COUNT_MAX: unknown


def _too_long(path: Path, seconds: float, max_seconds: float, limit_name: str,
              *, at_least: bool = False) -> AudioError:
    cut = convert_command(path, extra=f" -t {max_seconds:g}")
    return AudioError(
        f"{_shown(path)}: {'more than ' if at_least else ''}{seconds:.1f} s of audio, longer "
        f"than the {max_seconds:g} s limit ({limit_name}); raise the limit or keep the "
        f"start: {cut}"
    )


def read_audio(path: str | Path, rate: int = ASR_RATE, *, max_seconds: float | None = None,
               limit_name: str = "max_seconds") -> Audio:
    """Read a sound file as mono float32 at ``rate`` Hz (channels averaged, resampled).

    The file is decoded and resampled block by block, so memory holds little more than
    the result. With ``max_seconds``, a longer file is an AudioError that names
    ``limit_name`` (the setting behind the limit): refused before decoding when the
    header states the length, else as soon as the limit is passed.

    Raises AudioError for a missing, unreadable, too long or non-regular file and
    AudioFormatError for a corrupt, truncated, impossible or unsupported one. A valid
    file with no samples gives an empty :class:`Audio`.
    """
    path = Path(path)
    with _open_sound(path) as f:
        file_rate, channels = int(f.samplerate), int(f.channels)
        max_frames = None if max_seconds is None else math.ceil(max_seconds * file_rate)
        known = _known_frames(f)
        if max_frames is not None and known is not None and known > max_frames:
            raise _too_long(path, known / file_rate, float(max_seconds or 0), limit_name)
        resampler = Resampler(file_rate, rate)
        pieces: list[FloatArray] = []
        read = 0
        for mono in _mono_blocks(path, f, _block_frames(file_rate, channels, 1.0)):
            read += len(mono)
            if max_frames is not None and read > max_frames:
                raise _too_long(path, read / file_rate, float(max_seconds or 0), limit_name,
                                at_least=True)
            if not np.all(np.isfinite(mono)):
                raise AudioFormatError(
                    f"{_shown(path)}: contains NaN or infinite samples; " + _convert_hint(path))
            pieces.append(resampler.process(mono))
        pieces.append(resampler.flush())
    samples: FloatArray = np.concatenate(pieces)
    return Audio(samples, rate)


def _mono_blocks(path: Path, f: Any, block: int) -> Iterator[FloatArray]:
    """The open file's audio as mono float32 blocks of ``block`` frames; a decoder
    failure half-way through is an AudioError, not libsndfile's exception."""
    sf = _soundfile()
    blocks = f.blocks(blocksize=block, dtype="float32", always_2d=True)
    while True:
        try:
            data = next(blocks, None)
        except sf.LibsndfileError as exc:
            raise _unreadable(path, exc) from None
        except (RuntimeError, ValueError, EOFError) as exc:  # decoders inside libsndfile
            raise AudioFormatError(
                f"{_shown(path)}: corrupt audio data ({exc}); " + _convert_hint(path)) from None
        except OSError as exc:
            raise AudioError(
                f"{_shown(path)}: cannot read the file ({exc.strerror or exc})") from None
        if data is None:
            return
        yield to_mono(data)


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
    (bounded memory for files of any length); the file is checked as in
    :func:`read_audio`."""
    path = Path(path)
    with _open_sound(path) as f:
        resampler = Resampler(int(f.samplerate), rate)
        block = _block_frames(int(f.samplerate), int(f.channels), chunk_s)
        for mono in _mono_blocks(path, f, block):
            out = resampler.process(mono)
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
