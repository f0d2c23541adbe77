"""From a request to device commands: a fast local matcher first, the LLM second.

:class:`IntentMatcher` answers "turn on the kitchen light" in microseconds with no
model: it finds the device names of the :class:`~jarvis.devices.device_map.DeviceMap` in the words,
then the action phrases around them ("turn on", "switch ... off", "open", "lock", the
device's own phrases). It understands several devices in one request ("the kitchen light
and the porch light"), a room that picks one of two devices with the same name, and it
refuses questions ("is the light on?"), negations ("don't ...") and scheduled requests
("... in ten minutes"), which go to the LLM as conversation instead.

When the words look like a command but the matcher is not sure, the grammar-constrained
fallback (:mod:`jarvis.devices.chooser`) lets the LLM pick one (device, action) pair of the
map, or none. Either way only commands built by :meth:`DeviceMap.command` are returned.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from jarvis.devices.device_map import Device, DeviceCommand, DeviceMap, words


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


FILLERS = _wordset(
    "the a an my our please jarvis hey hi ok okay could can would will you kindly just "
    "now for me us right away thanks thank go ahead"
)
SEPARATORS = frozenset({"and", "then", "also"})
QUESTION_STARTS = _wordset(
    "is are was were what whats which who whos why how when where does do did should shall "
    "has have"
)
NEGATIONS = _wordset("not dont never cant wont shouldnt didnt doesnt isnt arent")
SCHEDULE_WORDS = _wordset(
    "after before until till tomorrow tonight later when whenever if unless every minute "
    "minutes min mins hour hours second seconds oclock noon midnight am pm"
)
NEUTRAL_WORDS = _wordset("in here there it its this that too so bit very already again")
"""Words that say nothing about the command; not counted as unknown."""
COMMAND_VERBS = _wordset(
    "turn switch power put set make get start stop open close shut lock unlock toggle raise "
    "lower dim brighten enable disable activate deactivate"
)

# Action phrases: word sequence -> action names to try, in order, on the device.
ACTION_PHRASES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("turn", "on"): ("on",), ("switch", "on"): ("on",), ("power", "on"): ("on",),
    ("put", "on"): ("on",), ("on",): ("on",), ("enable",): ("on",), ("activate",): ("on",),
    ("turn", "off"): ("off",), ("switch", "off"): ("off",), ("power", "off"): ("off",),
    ("shut", "off"): ("off",), ("shut", "down"): ("off",), ("off",): ("off",),
    ("disable",): ("off",), ("deactivate",): ("off",), ("kill",): ("off",),
    ("start",): ("start", "on"), ("stop",): ("stop", "off"), ("toggle",): ("toggle",),
    ("open",): ("open",), ("close",): ("close",), ("shut",): ("close",),
    ("raise",): ("open", "up"), ("lower",): ("close", "down"),
    ("lock",): ("lock",), ("unlock",): ("unlock",),
}
MAX_UNKNOWN_WORDS = 2
"""Words that are neither device, action, room nor filler tolerated in a request the
matcher executes on its own ("it's dark, turn on the kitchen light")."""


@dataclass(frozen=True)
class Matched:
    """Execute these commands and answer ``reply``."""

    commands: tuple[DeviceCommand, ...]

    @property
    def reply(self) -> str:
        return join_replies(c.reply for c in self.commands)


@dataclass(frozen=True)
class Ambiguous:
    """Several devices fit; ask back instead of guessing."""

    candidates: tuple[Device, ...]

    @property
    def question(self) -> str:
        names = [f"the {d.name}" + (f" in the {d.room}" if d.room else "")
                 for d in self.candidates]
        return f"Which one do you mean: {_join(names, 'or')}?"


@dataclass(frozen=True)
class NoMatch:
    """Not a command the matcher can execute."""

    looks_like_command: bool
    """True when the words name a device or room and a command verb: worth asking the
    grammar-constrained LLM fallback. False: answer it as conversation."""
    reason: str


MatchResult = Matched | Ambiguous | NoMatch


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    devices: tuple[Device, ...]


class IntentMatcher:
    """Fast, model-free intent matching against one device map (immutable: build a new
    matcher when the map is reloaded)."""

    def __init__(self, devices: DeviceMap, default_room: str = "") -> None:
        self.devices = devices
        self.default_room = words(default_room)
        self._forms: dict[tuple[str, ...], list[Device]] = {}
        for device in devices.devices:
            for form in device.forms():
                form = tuple(w for w in form if w not in FILLERS)
                if form and device not in self._forms.setdefault(form, []):
                    self._forms[form].append(device)
        self._max_form = max((len(f) for f in self._forms), default=0)
        self._rooms = devices.rooms()
        self._vocabulary = {w for form in self._forms for w in form} - {"in"}
        self._action_words = {w for d in devices.devices for a in d.actions.values()
                              for w in words(a.name.replace("_", " "))}

    def match(self, text: str) -> MatchResult:
        toks = [w for w in words(text) if w not in FILLERS]
        if not toks or not self._forms:
            return NoMatch(False, "no device map" if toks else "empty")
        if toks[0] in QUESTION_STARTS:
            return NoMatch(False, "a question")
        if NEGATIONS.intersection(toks):
            return NoMatch(False, "negated")
        spans = self._spans(toks)
        verb = bool(COMMAND_VERBS.intersection(toks) or self._action_words.intersection(toks))
        covered = {i for s in spans for i in range(s.start, s.end)}
        leftover = [w for i, w in enumerate(toks) if i not in covered]
        if SCHEDULE_WORDS.intersection(leftover) or _has_clock_time(leftover):
            return NoMatch(False, "scheduled or conditional")
        if not spans:
            return self._phrase_only(toks, verb)
        return self._resolve(toks, spans, verb)

    def candidates(self, text: str) -> tuple[Device, ...]:
        """Devices a request may be about, for the LLM fallback: those it names, else
        those sharing the most words with it (name, alias or room); () when none."""
        toks = [w for w in words(text) if w not in FILLERS]
        spans = self._spans(toks)
        if spans:
            return tuple(dict.fromkeys(d for s in spans for d in s.devices))
        present = set(toks) - NEUTRAL_WORDS - {"in"}
        scores = {d: len(present.intersection(w for f in d.forms() for w in f))
                  for d in self.devices.devices}
        best = max(scores.values(), default=0)
        return tuple(d for d, score in scores.items() if score == best) if best else ()

    # ------------------------------------------------------------------ internals

    def _spans(self, toks: Sequence[str]) -> list[_Span]:
        """Non-overlapping device mentions, longest first."""
        found: list[_Span] = []
        for length in range(min(self._max_form, len(toks)), 0, -1):
            for start in range(len(toks) - length + 1):
                devices = self._forms.get(tuple(toks[start : start + length]))
                if devices and not any(s.start < start + length and start < s.end
                                       for s in found):
                    found.append(_Span(start, start + length, tuple(devices)))
        return sorted(found, key=lambda s: s.start)

    def _resolve(self, toks: Sequence[str], spans: list[_Span], verb: bool) -> MatchResult:
        # Clauses: split the words at "and"/"then" outside device names.
        clauses: list[tuple[list[_Span], list[str]]] = [([], [])]
        by_start = {s.start: s for s in spans}
        i = 0
        while i < len(toks):
            if i in by_start:
                clauses[-1][0].append(by_start[i])
                i = by_start[i].end
                continue
            if toks[i] in SEPARATORS:
                clauses.append(([], []))
            else:
                clauses[-1][1].append(toks[i])
            i += 1
        clauses = [c for c in clauses if c[0] or c[1]]
        actions: list[tuple[str, ...] | None] = []
        unknown = 0
        for clause_spans, clause_words in clauses:
            found, rest = _actions_in(clause_words, self._custom_phrases(clause_spans))
            if len(set(found)) > 1:
                return NoMatch(True, "conflicting actions")
            actions.append(found[0] if found else None)
            unknown += sum(1 for w in rest if w not in COMMAND_VERBS
                           and w not in NEUTRAL_WORDS and w not in self._vocabulary)
            if found and not clause_spans:
                return NoMatch(True, "an action without a device")
        if unknown > MAX_UNKNOWN_WORDS:
            return NoMatch(verb, "too many other words")
        if all(a is None for a in actions):
            return NoMatch(verb, "no action")
        commands: list[DeviceCommand] = []
        for index, (clause_spans, clause_words) in enumerate(clauses):
            action = actions[index] or _nearest(actions, index)
            for span in clause_spans:
                device = self._pick(span, clause_words, toks)
                if isinstance(device, Ambiguous):
                    return device
                command = next((c for name in action or ()
                                if (c := self.devices.command(device.id, name)) is not None),
                               None)
                if command is None:
                    return NoMatch(True, f"{device.id} cannot do that")
                if all(c.device is not device for c in commands):
                    commands.append(command)
        if not commands:
            return NoMatch(True, "no device")
        return Matched(tuple(commands))

    def _phrase_only(self, toks: Sequence[str], verb: bool) -> MatchResult:
        """No device named: a device's own phrase may still say it ("make coffee")."""
        hits = {
            (device.id, action.name)
            for device in self.devices.devices
            for action in device.actions.values()
            for phrase in action.phrases
            if _contains(toks, tuple(w for w in words(phrase) if w not in FILLERS))
        }
        if len(hits) == 1:
            command = self.devices.command(*hits.pop())
            if command is not None and len(toks) <= 3 + MAX_UNKNOWN_WORDS:
                return Matched((command,))
        mentions = bool(self._vocabulary.intersection(toks))
        return NoMatch(verb and mentions, "no device named")

    def _custom_phrases(self, spans: Iterable[_Span]) -> dict[tuple[str, ...], tuple[str, ...]]:
        phrases: dict[tuple[str, ...], tuple[str, ...]] = {}
        for span in spans:
            for device in span.devices:
                for action in device.actions.values():
                    for phrase in (action.name.replace("_", " "), *action.phrases):
                        key = tuple(w for w in words(phrase) if w not in FILLERS)
                        if key:
                            phrases[key] = (*phrases.get(key, ()), action.name)
        return phrases

    def _pick(self, span: _Span, clause_words: Sequence[str],
              toks: Sequence[str]) -> Device | Ambiguous:
        if len(span.devices) == 1:
            return span.devices[0]
        for context in (clause_words, toks, self.default_room):
            rooms = {r for r in self._rooms if _contains(context, r)}
            fitting = [d for d in span.devices if words(d.room) in rooms]
            if len(fitting) == 1:
                return fitting[0]
        return Ambiguous(span.devices)


def _actions_in(
    clause: Sequence[str], custom: dict[tuple[str, ...], tuple[str, ...]]
) -> tuple[list[tuple[str, ...]], list[str]]:
    """Action phrases in ``clause`` (greedy, longest first; device-specific phrases
    before the built-in ones) and the words left over."""
    table = {**ACTION_PHRASES, **custom}
    longest = max(len(k) for k in table)
    found: list[tuple[str, ...]] = []
    rest: list[str] = []
    i = 0
    while i < len(clause):
        for length in range(min(longest, len(clause) - i), 0, -1):
            key = tuple(clause[i : i + length])
            if key in table:
                found.append(table[key])
                i += length
                break
        else:
            rest.append(clause[i])
            i += 1
    return found, rest


_NUMBERS = _wordset(
    "one two three four five six seven eight nine ten eleven twelve half quarter"
)


def _has_clock_time(toks: Sequence[str]) -> bool:
    """ "at 7", "at seven", "in 10", "in five" (minutes implied)."""
    pairs = itertools.pairwise(toks)
    return any(a in ("at", "in") and (b.isdigit() or b in _NUMBERS) for a, b in pairs)


def _nearest(actions: Sequence[tuple[str, ...] | None], index: int) -> tuple[str, ...] | None:
    before = [a for a in actions[:index] if a is not None]
    if before:
        return before[-1]
    return next((a for a in actions[index + 1 :] if a is not None), None)


def _contains(seq: Sequence[str], sub: Sequence[str]) -> bool:
    n = len(sub)
    return n > 0 and any(tuple(seq[i : i + n]) == tuple(sub) for i in range(len(seq) - n + 1))


def _join(items: Sequence[str], last: str) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {last} " + items[-1]


def join_replies(replies: Iterable[str]) -> str:
    """"Turning on the kitchen light." + "Opening the blinds." -> one sentence."""
    parts = [r.strip().rstrip(".") for r in replies if r.strip()]
    if not parts:
        return ""
    parts = [parts[0]] + [p[:1].lower() + p[1:] for p in parts[1:]]
    return _join(parts, "and") + "."
