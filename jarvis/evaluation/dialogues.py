"""Spoken-style multi-turn dialogues shared by the demo and the benchmarks, and the
long household system prompt (``jarvis/evaluation/data/home_system_prompt.txt``) they run under."""

from __future__ import annotations

from pathlib import Path

HOME_SYSTEM_PROMPT_FILE = Path(__file__).resolve().parent / "data" / "home_system_prompt.txt"

DIALOGUES: tuple[tuple[str, ...], ...] = (
    (
        "What's a quick dinner I can make with eggs and spinach?",
        "How long should I cook it for?",
        "Can I add some cheese to that?",
        "What would go well with it on the side?",
        "Great, thanks, I'll try that.",
    ),
    (
        "How far away is the moon?",
        "And how long would it take to fly there?",
        "Has anybody been there recently?",
        "Why did we stop going?",
        "Interesting, thank you Jarvis.",
    ),
    (
        "Remind me what a haiku is.",
        "Can you make one up about rain?",
        "Now one about coffee please.",
        "Which one do you like better?",
        "Okay, good night Jarvis.",
    ),
    (
        "What time does Biscuit get fed in the evening?",
        "And when is Leo's bedtime on a school night?",
        "What about at the weekend?",
        "Which rooms have a thermostat?",
        "Thanks, that's all.",
    ),
)


def home_system_prompt() -> str:
    """The bundled ~1,100-token household system prompt."""
    return HOME_SYSTEM_PROMPT_FILE.read_text(encoding="utf-8").strip()


def turn(client: int, index: int) -> str:
    """The ``index``-th request of client ``client`` (dialogues repeat as needed)."""
    dialogue = DIALOGUES[client % len(DIALOGUES)]
    return dialogue[index % len(dialogue)]
