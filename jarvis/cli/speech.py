"""Speech subcommands of ``jarvis``: ``transcribe``, ``say`` and ``devices``.

:func:`register` adds them to the main parser; each handler takes the parsed
arguments and the settings and returns the exit status. Errors are
:class:`~jarvis.errors.JarvisError` subclasses, printed by ``jarvis.cli.main`` as one line.
Results go to stdout, timings to stderr (so ``jarvis transcribe x.wav > x.txt``
keeps only the text).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jarvis.audio.devices import DeviceInfo, Kind
from jarvis.audio.errors import AudioDeviceError
from jarvis.config import Settings
from jarvis.errors import JarvisError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``transcribe``, ``say`` and ``devices`` to the ``jarvis`` parser."""
    transcribe = subparsers.add_parser(
        "transcribe", help="transcribe a sound file (WAV, FLAC, ...; any rate and channels)"
    )
    transcribe.add_argument("file", type=Path, help="the sound file")
    transcribe.add_argument("--json", action="store_true", help="print one JSON object")
    transcribe.set_defaults(handler=cmd_transcribe)

    say = subparsers.add_parser("say", help="speak text with the piper voice")
    say.add_argument("text", help="what to say")
    say.add_argument("-o", "--output", type=Path, metavar="OUT.wav",
                     help="write a WAV file instead of playing it")
    say.set_defaults(handler=cmd_say)

    devices = subparsers.add_parser("devices", help="list the sound devices PortAudio sees")
    devices.add_argument("--json", action="store_true", help="print one JSON object")
    devices.set_defaults(handler=cmd_devices)


# --------------------------------------------------------------------------- transcribe


def cmd_transcribe(args: argparse.Namespace, settings: Settings) -> int:
    from jarvis.audio.files import read_audio
    from jarvis.speech.asr import WhisperAsr

    # Fails fast, before the model loads; a file longer than JARVIS_MAX_INPUT_S is refused
    # unread (whisper's memory grows with the length of what it is given).
    audio = read_audio(args.file, max_seconds=settings.audio.max_input_s,
                       limit_name="JARVIS_MAX_INPUT_S")
    asr = WhisperAsr(settings.asr)
    asr.load()
    result = asr.transcribe(audio.samples)
    if args.json:
        print(json.dumps({
            "file": str(args.file),
            **result.to_dict(),
            "model": str(asr.model_path),
            "load_s": round(asr.load_s, 3),
        }, indent=2))
    else:
        print(result.text)
        note = "" if result.text else "no speech · "
        print(
            f"[{note}{result.language} · {result.duration_s:.2f} s of audio · transcribed in "
            f"{result.latency_s:.3f} s ({result.method}) · model {asr.model_label} loaded in "
            f"{asr.load_s:.2f} s]",
            file=sys.stderr,
        )
    return 0


# --------------------------------------------------------------------------- say


def cmd_say(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_say(args.text, args.output, settings))


async def _say(text: str, output: Path | None, settings: Settings) -> int:
    from jarvis.audio.devices import resolve_device
    from jarvis.audio.files import WavSink
    from jarvis.audio.stream import Speaker
    from jarvis.speech.phrase_cache import phrase_cache_dir
    from jarvis.speech.tts import PiperTts, TtsError

    if not text.strip():
        raise TtsError("nothing to say: the text is empty")
    if output is None:  # fail before the voice loads if there is nothing to play on
        resolve_device(settings.audio.output_device, "output")
    tts = PiperTts(settings.tts, phrase_cache_dir(settings.cache.dir))
    await tts.start()
    started = time.perf_counter()
    first: list[float] = []
    try:
        async def samples() -> AsyncIterator[Any]:
            async for chunk in tts.stream(text):
                if not first:
                    first.append(time.perf_counter() - started)
                yield chunk.samples

        if output is not None:
            with WavSink(output, tts.sample_rate) as sink:
                async for block in samples():
                    sink.write(block)
            seconds = sink.frames / tts.sample_rate
            print(f"wrote {output} ({seconds:.2f} s of audio at {tts.sample_rate} Hz)")
        else:
            speaker = Speaker(settings.audio.output_device)
            seconds = await speaker.play(samples(), tts.sample_rate)
    finally:
        tts.close()
    if not first:
        raise TtsError(f"nothing to say: {text[:40]!r} produced no audio")
    print(f"[first audio after {first[0]:.3f} s · {seconds:.2f} s of speech · voice "
          f"{tts.voice_path.name if tts.voice_path else '?'} loaded in {tts.load_s:.2f} s]",
          file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- devices


def cmd_devices(args: argparse.Namespace, settings: Settings) -> int:
    from jarvis.audio.devices import HEADLESS_HINT, list_devices, resolve_device

    devices = list_devices()
    selected: dict[str, DeviceInfo | AudioDeviceError | None] = {}
    kinds: tuple[tuple[Kind, str], ...] = (
        ("input", settings.audio.input_device), ("output", settings.audio.output_device))
    for kind, spec in kinds:
        try:
            selected[kind] = resolve_device(spec, kind) if devices else None
        except AudioDeviceError as exc:
            selected[kind] = exc
    if args.json:
        print(json.dumps({
            "devices": [asdict(d) for d in devices],
            "listening": _listening_lines(
                settings, speaker=isinstance(selected["output"], DeviceInfo),
                microphone=isinstance(selected["input"], DeviceInfo)),
            **{f"selected_{k}": (v.index if isinstance(v, DeviceInfo) else None)
               for k, v in selected.items()},
            **{f"{k}_error": str(v) for k, v in selected.items() if isinstance(v, JarvisError)},
        }, indent=2))
        return 0 if devices else 1
    if not devices:
        print(f"jarvis: {HEADLESS_HINT}", file=sys.stderr)
        return 1
    print(f"{'':3}{'#':>3}  {'name':<40} {'in':>3} {'out':>3} {'rate':>7}  host API")
    for d in devices:
        marks = ("<" if _same(d, selected["input"]) else " ") + (
            ">" if _same(d, selected["output"]) else " ")
        print(f"{marks:3}{d.index:>3}  {d.name[:40]:<40} {d.max_input_channels:>3} "
              f"{d.max_output_channels:>3} {int(d.default_samplerate):>7}  {d.hostapi}")
    print("\n< microphone, > speaker, as JARVIS_INPUT_DEVICE / JARVIS_OUTPUT_DEVICE select "
          "them (name substring or index; empty = system default)")
    for name, value in selected.items():
        if isinstance(value, JarvisError):
            print(f"{name}: {value}", file=sys.stderr)
    print("\nListening with these devices (jarvis run):")
    for line in _listening_lines(settings, speaker=isinstance(selected["output"], DeviceInfo),
                                 microphone=isinstance(selected["input"], DeviceInfo)):
        print(f"  {line}")
    return 0


def _listening_lines(settings: Settings, *, speaker: bool, microphone: bool) -> list[str]:
    """Which of wake word, echo cancellation and barge-in `jarvis run` would turn on."""
    from jarvis.voice.listening import plan_listening

    try:
        return plan_listening(settings.pipeline, speaker=speaker, microphone=microphone).lines()
    except JarvisError as exc:
        return [f"error: {exc}"]


def _same(device: DeviceInfo, other: DeviceInfo | AudioDeviceError | None) -> bool:
    return isinstance(other, DeviceInfo) and device.index == other.index
