"""Spoken-style multi-turn dialogues shared by the demo and the benchmarks, and the
long household system prompt (``jarvis/evaluation/data/home_system_prompt.txt``) they run under."""

from __future__ import annotations

import random
import re
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


# ---------------------------------------------------------------------- long sessions

EVERYDAY: tuple[str, ...] = (
    "What's a good bedtime for a six year old?",
    "Tell me a joke about cats.",
    "How do I boil an egg?",
    "What should I wear if it's cold outside?",
    "Can you suggest a game for the kids?",
    "How long does bread take to bake?",
    "What's a nice name for a goldfish?",
    "How do I get a stain out of a shirt?",
    "Give me an idea for a birthday present.",
    "How many glasses of water should I drink a day?",
    "What can I cook for a vegetarian lunch?",
    "Why is the sky blue?",
    "What's the best way to fall asleep quickly?",
    "How do I keep basil alive on the windowsill?",
    "Suggest a short walk for a rainy afternoon.",
    "What do dogs like to play with?",
    "How can I make my coffee less bitter?",
    "Tell me something interesting about octopuses.",
    "What's a healthy snack for after school?",
    "How should I clean the oven?",
)
"""Everyday one-off requests a new user tries, in blocks of five."""

MISHEARD: dict[str, str] = {
    "bedtime": "man time", "dinner": "thinner", "eggs": "legs", "egg": "leg",
    "spinach": "spin itch", "cook": "hook", "cheese": "keys", "side": "sight",
    "moon": "noon", "fly": "fry", "recently": "decently", "stop": "shop",
    "haiku": "high coo", "rain": "train", "coffee": "toffee", "better": "butter",
    "fed": "bed", "evening": "even ink", "school": "cool", "weekend": "week and",
    "rooms": "brooms", "thermostat": "thermos that", "joke": "choke", "cats": "hats",
    "boil": "oil", "wear": "where", "cold": "gold", "game": "gain", "kids": "kits",
    "bread": "bed", "bake": "break", "name": "main", "goldfish": "gold dish",
    "stain": "stein", "shirt": "short", "birthday": "bath day", "present": "pleasant",
    "glasses": "classes", "water": "waiter", "vegetarian": "veteran", "lunch": "launch",
    "sky": "ski", "blue": "glue", "asleep": "a sheep", "quickly": "quick lee",
    "basil": "bagel", "windowsill": "window sale", "walk": "wok", "rainy": "brainy",
    "afternoon": "after new", "dogs": "docks", "play": "pray", "bitter": "bidder",
    "octopuses": "octopus is", "snack": "snake", "healthy": "wealthy", "clean": "lean",
    "oven": "often", "far": "car", "long": "wrong", "thanks": "tanks", "night": "knight",
    "one": "won", "like": "bike", "made": "maid", "quick": "click", "make": "bake",
}
"""Words and what a small speech recogniser plausibly hears instead."""

_FILLERS = frozenset({"the", "a", "an", "to", "for", "of", "it", "is", "do", "i", "me"})


def garble(text: str, seed: int = 0) -> str:
    """``text`` as a speech recogniser might mishear it, deterministically for a given
    ``(text, seed)``: one or two words replaced by sound-alikes ("a good bedtime" ->
    "a good man time"), sometimes a small word dropped, punctuation kept. The result
    always differs from ``text``."""
    rng = random.Random(f"{seed}:{text}")
    words = text.split()
    keys = [re.sub(r"[^a-z']", "", w.lower()) for w in words]
    candidates = [i for i, k in enumerate(keys) if k in MISHEARD]
    rng.shuffle(candidates)
    for i in sorted(candidates[:rng.choice((1, 2))]):
        tail = re.sub(r"^[A-Za-z']+", "", words[i])  # keep trailing punctuation
        words[i] = MISHEARD[keys[i]] + tail
    fillers = [i for i, k in enumerate(keys) if k in _FILLERS and i not in candidates[:2]]
    if fillers and (not candidates or rng.random() < 0.5):
        del words[rng.choice(fillers)]
    out = " ".join(words)
    if out == text and len(words) > 1:  # nothing to mishear: swap two neighbours
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
        out = " ".join(words)
    return out


def session(index: int, turns: int = 20) -> list[str]:
    """The ``index``-th long session: blocks of five related requests (the dialogues
    and the everyday requests), a different mix and order per index."""
    blocks = [*DIALOGUES, *(EVERYDAY[i:i + 5] for i in range(0, len(EVERYDAY), 5))]
    requests: list[str] = []
    j = 0
    while len(requests) < turns:
        requests.extend(blocks[(index + 2 * j) % len(blocks)])
        j += 1
    return requests[:turns]


def garbled_turns(index: int, turns: int = 20, share: float = 0.25) -> list[int]:
    """Which turns of session ``index`` are misheard: ``share`` of them, never the
    first, spread deterministically."""
    count = round(turns * share)
    return sorted(random.Random(index).sample(range(1, turns), min(count, turns - 1)))
