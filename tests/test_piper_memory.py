"""piper's memory: onnxruntime's CPU arena is shrunk after each synthesis call and the C
heap trimmed, so resident memory does not ratchet up with each new longest sentence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jarvis.config import physical_cores
from jarvis.models import starter_voice_path
from jarvis.speech import piper_voice
from jarvis.speech.piper_voice import SHRINK_ARENA, ChunkedVoice
from jarvis.speech.tts import PiperTts

_CLAUSE = "the kitchen lights are on and the heating is set to twenty degrees"


def sentence(chars: int) -> str:
    """A sentence of about ``chars`` characters."""
    words = (_CLAUSE + " ") * (chars // len(_CLAUSE) + 1)
    return words[:chars].rsplit(" ", 1)[0].capitalize() + "."


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def shrinks(options: Any) -> bool:
    return options is not None and options.get_run_config_entry(SHRINK_ARENA) == "cpu:0"


def test_each_call_ends_by_shrinking_the_arena_and_trimming_the_heap(
        tts: PiperTts, monkeypatch: pytest.MonkeyPatch) -> None:
    voice = tts._voice
    assert voice is not None and voice.streaming
    runs: list[tuple[str, bool]] = []
    for name, session in (("encoder", voice._encoder), ("decoder", voice._decoder)):
        def run(output: Any, feed: Any, options: Any = None, *, _name: str = name,
                _run: Any = session.run) -> Any:
            runs.append((_name, shrinks(options)))
            return _run(output, feed, options)
        monkeypatch.setattr(session, "run", run)
    trims: list[int] = []
    monkeypatch.setattr(piper_voice, "trim_heap", lambda: trims.append(len(runs)))

    assert not voice._options.enable_mem_pattern  # per-tensor allocations

    list(voice.audio_parts("Okay. " + sentence(150)))  # the second in 3+ windows
    encoder = [i for i, (name, _) in enumerate(runs) if name == "encoder"]
    assert len(encoder) == 2 and len(runs) - encoder[1] >= 4
    # the call's last encoder run releases the arena; the windows' arena (bounded) is kept
    assert [s for _, s in runs] == [i == encoder[1] for i in range(len(runs))]
    assert trims == [len(runs)]  # then the heap is trimmed, once

    runs.clear()
    trims.clear()
    list(voice.audio_parts("Okay. " + sentence(80), windows=False))
    # ... and a window of zeros takes the windows' arena back after a whole decode
    assert runs == [("encoder", False), ("decoder", False), ("encoder", True),
                    ("decoder", True), ("decoder", False)] and trims == [5]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")
def test_resident_memory_does_not_ratchet_up_with_longer_sentences() -> None:
    path = starter_voice_path()
    if path is None:
        pytest.skip("the starter voice is not installed")
    # A fresh voice: its sessions' arenas have not seen long sentences yet.
    voice = ChunkedVoice(path, deterministic=True, threads=physical_cores())
    list(voice.audio_parts("Hello there.", windows=False))
    list(voice.audio_parts("Hello there."))
    piper_voice.trim_heap()
    start = rss_mib()
    after = []
    for chars in (60, 100, 140, 180, 220, 240):
        list(voice.audio_parts(sentence(chars), windows=False))
        list(voice.audio_parts(sentence(chars)))
        after.append(rss_mib())
    # Before: each new longest sentence grew the arena for good, about +200 MiB over
    # these; now a call's memory is handed back after it, and the windows' arena is
    # held from the start.
    assert max(after) - start < 64, [round(a - start) for a in after]
