"""``jarvis`` command line: parse arguments, load settings once, run one subcommand.

Every :class:`~jarvis.errors.JarvisError` ends the program with one line on stderr
and exit status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jarvis import __version__
from jarvis.config import Settings, load_settings
from jarvis.errors import JarvisError

if TYPE_CHECKING:
    from jarvis.voice.turn import TurnResult

log = logging.getLogger("jarvis")
_QUIET_COMMANDS = {"ask", "config", "cache"}
_MODEL_FREE_COMMANDS = {"config", "devices", "satellite"}
"""Commands that never load the language model: they run where none is installed (a
satellite's board, see requirements-satellite.txt)."""

DEMO_REQUESTS = (
    "Hey Jarvis, what can you help me with?",
    "What's the capital of France?",
    "And roughly how many people live there?",
    "Give me a quick tip for sleeping better.",
    "Thanks, that's all for now.",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        settings = load_settings(model=args.command not in _MODEL_FREE_COMMANDS)
        level = settings.general.log_level
        if args.command in _QUIET_COMMANDS and settings.sources["JARVIS_LOG_LEVEL"] == "default":
            level = "WARNING"  # one-shot commands print results, not start-up chatter
        _setup_logging(level, args.verbose)
        for warning in settings.warnings:
            log.warning(warning)
        result: int = args.handler(args, settings)
        return result
    except JarvisError as exc:
        print(f"jarvis: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jarvis: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jarvis", description="Offline, low-latency voice assistant backend."
    )
    parser.add_argument("--version", action="version", version=f"jarvis {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ask = sub.add_parser("ask", help="answer one text request with the local model")
    ask.add_argument("text", help="what you would say to Jarvis")
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.add_argument("--speak", action="store_true", help="also speak the reply")
    ask.add_argument("-o", "--output", type=Path, help="with --speak: write a WAV instead")
    ask.set_defaults(handler=_cmd_ask)

    run = sub.add_parser("run", help="the always-on assistant: microphone in, speaker out")
    run.add_argument("--input", type=Path, help="use a recording as the microphone")
    run.add_argument("--output", type=Path, help="write each reply as a WAV in this directory")
    run.add_argument("--no-audio", action="store_true",
                     help="no sound devices: text in and out over MQTT only (hub mode)")
    run.set_defaults(handler=_cmd_run)

    converse = sub.add_parser("converse", help="one voice turn from an audio file")
    converse.add_argument("file", type=Path, help="WAV/FLAC with the request")
    converse.add_argument("--output", type=Path, help="write the reply as a WAV (else play it)")
    converse.add_argument("--json", action="store_true")
    converse.set_defaults(handler=_cmd_converse)

    demo = sub.add_parser("demo", help="spoken requests through the voice pipeline, then the "
                          "latency report")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(handler=_cmd_demo)

    config = sub.add_parser("config", help="print the effective settings (secrets masked)")
    config.add_argument("--json", action="store_true")
    config.set_defaults(handler=_cmd_config)

    from jarvis.cli.mqtt import register as register_mqtt
    from jarvis.cli.satellite import register as register_satellite
    from jarvis.cli.speech import register as register_speech
    from jarvis.cli.wyoming import register as register_wyoming

    register_speech(sub)
    register_mqtt(sub)
    register_wyoming(sub)
    register_satellite(sub)

    cache = sub.add_parser("cache", help="inspect or empty the persistent context cache")
    cache.add_argument("action", choices=("stats", "clear"))
    cache.add_argument("--json", action="store_true")
    cache.set_defaults(handler=_cmd_cache)
    return parser


def _setup_logging(level: str, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else getattr(logging, level),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# --------------------------------------------------------------------------- ask


def _cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_ask(args.text, settings, args.output, speak=bool(args.speak or args.output),
                            as_json=args.json))


async def _ask(text: str, settings: Settings, output: Path | None, *, speak: bool,
               as_json: bool) -> int:
    """One text turn through the responder (device map, then the model), printed as it
    arrives, and spoken when asked."""
    from jarvis.voice.assembly import build_assistant
    from jarvis.voice.events import Source
    from jarvis.voice.turn import Turn, validate_request

    validate_request(text)  # the same message as every entry point, before loading
    sink = await _ready_sink(settings, output) if speak else None
    # One-shot: the system prompt is evaluated with the request (or restored from disk),
    # not prefilled first.
    assistant = await build_assistant(settings, listen=False, speak=speak,
                                      prefill_system=False)
    streamed = not as_json and not speak

    def show(piece: str) -> None:
        print(piece, end="", flush=True)

    turn = Turn(Source.CLI, None, request=text, on_text=show if streamed else None)
    try:
        result = await assistant.responder.respond(turn, sink)
        backend = _backend_json(assistant.backend.info())
    finally:
        await assistant.close()
    if streamed:
        print()
    _print_turn(result, as_json, printed=streamed, backend=backend)
    if result.outcome.value == "failed":
        raise JarvisError(result.error)
    return 0


def _sink(settings: Settings, output: Path | None, *, directory: bool = False) -> Any:
    from jarvis.voice.sinks import SpeakerSink, WavReplySink

    if output is None:
        return SpeakerSink(settings.audio.output_device)
    return WavReplySink(output, realtime=directory, single_file=not directory)


async def _ready_sink(settings: Settings, output: Path | None) -> Any:
    """The sink a one-shot command speaks through. A speaker is opened and closed once
    first, so that a machine with no usable output says so now, before any model loads,
    instead of printing a reply nobody heard and exiting 0."""
    from jarvis.audio.errors import AudioDeviceError
    from jarvis.voice.sinks import SpeakerSink

    sink = _sink(settings, output)
    if isinstance(sink, SpeakerSink):
        try:
            await sink.check()
        except AudioDeviceError as exc:
            raise AudioDeviceError(f"{exc}; or write the reply to a file with "
                                   "--output reply.wav") from None
    return sink


def _print_turn(result: TurnResult, as_json: bool, *, printed: bool = False,
                backend: dict[str, Any] | None = None) -> None:
    if as_json:
        print(json.dumps({**_turn_json(result), **({"backend": backend} if backend else {})},
                         indent=2))
        return
    if result.transcript:
        print(f"you>    {result.transcript}")
    if not printed and result.outcome.value not in ("failed", "ignored"):
        print(f"jarvis> {result.reply}" if result.transcript else result.reply)
    parts = [f"{_LABELS.get(k, k)} {v:.3f} s" for k, v in result.latency.items()]
    stats = result.stats
    if "prompt_tokens" in stats:
        parts.append(f"prompt {stats['prompt_tokens']} tokens ({stats['cached_tokens']} from "
                     f"cache) · {stats['completion_tokens']} tokens · {stats['finish_reason']}")
    if result.actions:
        parts.append("actions " + ", ".join(f"{a['device']}.{a['action']}"
                                            for a in result.actions))
    print("        [" + " · ".join(parts) + "]", file=sys.stderr)


_LABELS = {"llm_ttft": "first token", "tts_first": "first audio after it",
           "voice_to_voice": "voice to voice", "asr": "speech recognition",
           "devices": "device map"}


def _turn_json(result: TurnResult) -> dict[str, Any]:
    stats = result.stats
    return {
        "transcript": result.transcript, "request": result.request, "reply": result.reply,
        "outcome": result.outcome.value, "intent": result.intent,
        "failed_stage": result.failed_stage.value if result.failed_stage else None,
        "error": result.error or None, "interrupted": result.interrupted,
        "ignored": result.ignored, "regenerated": result.regenerated,
        "actions": result.actions,
        "latency_s": {k: round(v, 4) for k, v in result.latency.items()},
        "ttft_s": _round(_float(stats.get("ttft_s"))),
        "total_s": _round(_float(stats.get("total_s", result.latency.get("total")))),
        "prompt_tokens": stats.get("prompt_tokens"), "cached_tokens": stats.get("cached_tokens"),
        "completion_tokens": stats.get("completion_tokens"),
        "finish_reason": stats.get("finish_reason"), "cache_hit": stats.get("cache_hit"),
    }


def _backend_json(info: dict[str, Any]) -> dict[str, Any]:
    """Which backend answered: ``local`` (the in-process engine) or ``remote`` (the LLM
    server); with ``JARVIS_LLM_FALLBACK=local`` whichever did (None: the model was not
    asked, e.g. a device command the matcher settled)."""
    if info.get("backend") != "remote":
        return {"answered_by": "local", "model": info.get("model_path"), "url": None}
    answered = info.get("answered_by", "remote") if "fallback" in info else "remote"
    local = info.get("local", {})
    return {"answered_by": answered, "url": info.get("url"), "server": info.get("server"),
            "model": local.get("model_path") if answered == "local" else info.get("model"),
            "fallback": info.get("fallback")}


def _float(x: object) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# --------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_demo(settings, as_json=args.json))


async def _demo(settings: Settings, *, as_json: bool) -> int:
    """Spoken requests (synthesised by the bundled voice) through the whole voice
    pipeline in real time, replies written as WAVs; then the latency report."""
    import tempfile

    from jarvis.audio.formats import ASR_RATE, to_float32
    from jarvis.audio.resample import resample
    from jarvis.voice.assembly import build_assistant
    from jarvis.voice.events import EventType, TurnEvent
    from jarvis.voice.pipeline import spoken_turns
    from jarvis.voice.sinks import WavReplySink

    assistant = await build_assistant(settings)
    out = Path(tempfile.mkdtemp(prefix="jarvis-demo-"))
    try:
        if not as_json:
            print(f"Jarvis demo · {settings.llm.model_path.name} · "
                  f"{assistant.backend.info()['gpu']} · ready in {assistant.ready_s:.1f} s\n"
                  "Each request is spoken by the bundled voice and fed to the pipeline as a "
                  "microphone would deliver it.\n", flush=True)

        def show(event: TurnEvent) -> None:
            if as_json:
                return
            if event.type is EventType.TRANSCRIPT:
                print(f"heard>  {event.text}", flush=True)
            elif event.type is EventType.TURN_END:
                v2v = event.data.get("latency", {}).get("voice_to_voice")
                outcome = event.outcome.value if event.outcome else "?"
                print(f"jarvis> {event.text}\n        [{outcome} · voice to voice "
                      f"{v2v if v2v is None else round(v2v, 3)} s]\n", flush=True)
            elif event.type is EventType.ERROR:
                print(f"error>  {event.stage}: {event.text}", flush=True)

        pipeline, tts = assistant.voice(), assistant.tts
        assert tts is not None
        pipeline.subscribe(show)
        requests = [resample(to_float32(tts.synthesize(text)), tts.sample_rate, ASR_RATE)
                    for text in DEMO_REQUESTS]
        sink = WavReplySink(out)
        await pipeline.run(spoken_turns(pipeline, requests), sink)
        cache_stats = assistant.backend.cache.stats()
    finally:
        await assistant.close()
    summary = assistant.tracker.summary()
    if as_json:
        print(json.dumps({"latency": summary.to_dict(), "cache": cache_stats.to_dict(),
                          "replies": [str(p) for p in sink.written]}, indent=2))
    else:
        print("Voice-to-voice latency (last voiced sample -> first reply audio):")
        print(summary.format_table())
        print(f"\nreplies written to {out}")
    return 0


# --------------------------------------------------------------------------- voice


def _cmd_converse(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_converse(args.file, args.output, settings, as_json=args.json))


async def _converse(file: Path, output: Path | None, settings: Settings, *,
                    as_json: bool) -> int:
    import time

    from jarvis.audio.files import read_audio
    from jarvis.voice.assembly import build_assistant
    from jarvis.voice.pipeline import Utterance

    # Both checks fail fast, before any model loads: a file that is not audio or too
    # long to hold (JARVIS_MAX_INPUT_S), and a machine with nothing to play the reply on.
    audio = read_audio(file, max_seconds=settings.audio.max_input_s,
                       limit_name="JARVIS_MAX_INPUT_S")
    sink = await _ready_sink(settings, output)
    assistant = await build_assistant(settings, listen=False)
    try:
        result = await assistant.voice().voice_turn(
            Utterance(audio.samples, time.monotonic()), sink)
    finally:
        await assistant.close()
    _print_turn(result, as_json)
    if result.outcome.value == "failed":
        raise JarvisError(result.error)
    if result.ignored:  # not an error, but not an answer either: say why, exit 1
        why = ("no speech was heard in it" if not result.transcript else
               f"it does not start with the wake phrase {settings.pipeline.wake_word!r}")
        print(f"jarvis: nothing answered: {why}", file=sys.stderr)
        return 1
    return 0


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    if args.no_audio:
        from jarvis.cli.mqtt import hub_handler

        return hub_handler(args, settings)
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    """Run until the input ends or SIGINT/SIGTERM; then shut down cleanly."""
    from jarvis.cli.mqtt import install_stop_signals

    main = asyncio.current_task()
    assert main is not None
    # The first signal stops; a second does not cut the shutdown short (MQTT drain,
    # caches being saved); a third ends the process at once.
    install_stop_signals(asyncio.get_running_loop(), main.cancel)
    try:
        return await _run_voice(args, settings)
    except asyncio.CancelledError:
        log.info("stopped")
        return 0


async def _run_voice(args: argparse.Namespace, settings: Settings) -> int:
    from jarvis.audio.errors import AudioDeviceError
    from jarvis.audio.files import file_source
    from jarvis.audio.stream import Microphone
    from jarvis.voice.assembly import build_assistant
    from jarvis.voice.sinks import SilentSink, SpeakerSink
    from jarvis.wyoming.server import WyomingServer, start_wyoming

    speaker = args.output is None
    if speaker:
        try:
            await SpeakerSink(settings.audio.output_device).check()
        except AudioDeviceError as exc:
            # Listening goes on: MQTT and Wyoming still get every reply as text.
            log.warning("%s: replies are not played; echo cancellation is off", exc)
            speaker = False
    assistant = await build_assistant(settings, speaker=speaker,
                                      microphone=args.input is None)
    pipeline = assistant.voice()
    sink: Any
    if speaker:
        sink = SpeakerSink(settings.audio.output_device, reference=assistant.reference)
    elif args.output is None:
        sink = SilentSink()
    else:
        sink = _sink(settings, args.output, directory=True)
    pipeline.subscribe(_log_event)
    bridge_task: asyncio.Task[None] | None = None
    stop_bridge = asyncio.Event()
    wyoming: WyomingServer | None = None
    stack = contextlib.AsyncExitStack()
    try:
        if settings.mqtt.enabled:
            from jarvis.home.hub import attach_mqtt

            bridge, _ = await attach_mqtt(settings, assistant, sink)
            bridge_task = asyncio.create_task(bridge.run(stop_bridge))
        if settings.wyoming.enabled:  # Home Assistant's voice services, the same responder
            wyoming = await start_wyoming(settings, assistant)
        if settings.satellites.enabled:  # a room per satellite, the same responder
            from jarvis.wyoming.rooms import satellite_service

            rooms = await stack.enter_async_context(satellite_service(settings)(assistant))
            log.info("rooms: %s", ", ".join(rooms.links) or "(found on the network)")
        if args.input is not None:
            # Streamed from disk at the pace of the audio (bounded memory for long files);
            # the endpointer closes the last utterance when the file ends.
            await pipeline.run(file_source(args.input, realtime=True), sink)
        else:
            async with Microphone(settings.audio.input_device) as mic:
                log.info("listening (Ctrl-C to stop)")
                await pipeline.run(mic, sink)
    finally:
        await asyncio.shield(stack.aclose())
        if wyoming is not None:
            await asyncio.shield(wyoming.stop())
        if bridge_task is not None:
            # Drains: the MQTT reply in progress may finish (JARVIS_SHUTDOWN_GRACE_S), the
            # asks still waiting stay with the broker; then "offline" and a flush.
            stop_bridge.set()
            await asyncio.shield(asyncio.wait(
                {bridge_task}, timeout=settings.mqtt.shutdown_grace_s + 10))
        await assistant.close()
        print(assistant.tracker.summary().format_table(), file=sys.stderr)
    return 0


def _log_event(event: Any) -> None:
    from jarvis.voice.events import EventType

    if event.type is EventType.TRANSCRIPT:
        log.info("turn %s heard: %s", event.turn_id, event.text)
    elif event.type is EventType.TURN_END:
        log.info("turn %s %s: %s", event.turn_id, event.outcome.value, event.text)
    elif event.type is EventType.ERROR:
        log.error("turn %s: %s failed: %s", event.turn_id, event.stage.value, event.text)


# --------------------------------------------------------------------------- config, cache


def _cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    rows = settings.describe(mask_secrets=True)
    if args.json:
        print(json.dumps({name: {"value": value, "source": source}
                          for name, value, source in rows}, indent=2))
        return 0
    width = max(len(name) for name, _, _ in rows)
    for name, value, source in rows:
        shown = value.replace("\n", "\\n")
        if len(shown) > 70:
            shown = shown[:67] + "..."
        print(f"{name:<{width}}  {shown}  ({source})")
    return 0


def _cmd_cache(args: argparse.Namespace, settings: Settings) -> int:
    from jarvis.llm.cache import disk_usage

    directory = settings.cache.dir
    if directory is None:
        print("persistence is off (JARVIS_CACHE_DIR is empty)")
        return 0
    if args.action == "clear":
        from jarvis.diskstore import StoreUnavailable, clear_store
        from jarvis.speech.phrase_cache import phrase_cache_dir

        phrases_dir = phrase_cache_dir(directory)
        try:  # a corrupt database is moved aside first; a read-only one is an error
            records = clear_store(directory, what="context cache")
            phrases = clear_store(phrases_dir, what="TTS phrase cache") if phrases_dir else 0
        except StoreUnavailable as exc:
            raise JarvisError(f"cannot clear the cache: {exc}") from None
        print(f"cleared the context cache in {directory} ({records} records) and the TTS "
              f"phrase cache ({phrases} phrases)")
        return 0
    usage = disk_usage(settings.cache)
    if args.json:
        print(json.dumps(usage, indent=2))
    else:
        for key, value in usage.items():
            print(f"{key:<20} {value}")
    return 0
