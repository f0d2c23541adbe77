"""Spoken test audio for the speech tests and benchmarks (nothing at run time needs it):
two voices, noise at a chosen signal-to-noise ratio, and a disk cache for corpora.

- :func:`piper_say`: the bundled piper voice (natural, one male speaker) at any speed
  (``length_scale`` 0.8 is 25 % faster, 1.2 is 20 % slower).
- :func:`shift_voice`: a recording played faster or slower (pitch, tempo and formants
  together), a stand-in for a talker with a shorter or longer vocal tract.
- :func:`espeak_say`: espeak-ng (formant synthesis, robotic, but many accents and
  male/female variants and any speed), through the ``espeak-ng`` command
  (``apt-get install espeak-ng``; ``make setup`` installs it).
- :func:`add_noise`: white, pink or babble noise at ``snr_db`` below the speech's
  active level (the level of its voiced parts, not diluted by pauses).
- :func:`cached_audio`: compute an array once, keep it as ``.npy`` under
  :func:`cache_dir`.

Every function returns 16 kHz mono float32 (:data:`~jarvis.audio.formats.ASR_RATE`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from jarvis.audio.formats import ASR_RATE, FloatArray, to_float32
from jarvis.audio.resample import resample

if TYPE_CHECKING:
    from jarvis.speech.tts import PiperTts

ESPEAK_VOICES: tuple[str, ...] = (
    "en-us", "en-us+f3", "en-us+f4", "en-us+m3", "en-us+klatt3", "en-us+belinda",
    "en-us+shelby", "en-us+steph", "en", "en+aunty", "en-gb-x-rp", "en-gb-x-rp+f3",
    "en-gb-scotland", "en-029",
)
"""English espeak-ng voices and variants (``language+variant``) with some spread:
American, British (RP, Scottish), Caribbean; male defaults, female and Klatt variants."""

NOISE_KINDS = ("white", "pink", "babble")


class EspeakMissingError(RuntimeError):
    """The ``espeak-ng`` command is not installed."""


# --------------------------------------------------------------------------- voices


_PIPER_SPEEDS: dict[tuple[int, float], PiperTts] = {}


def piper_say(tts: PiperTts, text: str, length_scale: float | None = None) -> FloatArray:
    """``text`` said by the piper voice ``tts`` (loaded), at 16 kHz.

    ``length_scale`` multiplies the voice's phoneme durations (piper's
    ``SynthesisConfig.length_scale``; below 1 is faster). None, or the value ``tts`` was
    loaded with, uses ``tts`` itself; another value loads a copy of the voice with that
    setting once (about a second) and keeps it for later calls.
    """
    voice = tts
    if length_scale is not None and not math.isclose(length_scale, tts.settings.length_scale):
        key = (id(tts), round(length_scale, 4))
        if key not in _PIPER_SPEEDS:
            from jarvis.speech.tts import PiperTts

            settings = dataclasses.replace(tts.settings, length_scale=length_scale)
            copy = PiperTts(settings, deterministic=tts.deterministic)
            copy.load()
            _PIPER_SPEEDS[key] = copy
        voice = _PIPER_SPEEDS[key]
    return resample(voice.synthesize(text), voice.sample_rate, ASR_RATE)


def shift_voice(audio: npt.ArrayLike, factor: float) -> FloatArray:
    """16 kHz ``audio`` played ``factor`` times as fast: resampled as if it had been
    recorded at ``factor`` x 16 kHz, so pitch, formants and tempo all scale by
    ``factor`` (1.1: a higher, quicker voice with a shorter vocal tract, 10 % shorter;
    0.9: a lower, slower one). ``factor`` in [0.5, 2]."""
    if not 0.5 <= factor <= 2.0:
        raise ValueError(f"shift_voice: factor must be in [0.5, 2], got {factor}")
    return resample(audio, round(ASR_RATE * factor), ASR_RATE)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak_say(text: str, voice: str = "en-us", speed_wpm: int = 175,
               pitch: int = 50) -> FloatArray:
    """``text`` said by espeak-ng's ``voice`` (``espeak-ng --voices=en`` lists them;
    ``+f3``-style suffixes pick a variant) at ``speed_wpm`` words per minute and
    ``pitch`` (0-99), resampled to 16 kHz.

    Raises :class:`EspeakMissingError` when espeak-ng is not installed and
    ``RuntimeError`` when it fails (an unknown voice).
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakMissingError(
            "espeak-ng is not installed: apt-get install espeak-ng (make setup installs it)")
    if not text.strip():
        raise ValueError("espeak_say: nothing to say")
    _check_voice(exe, voice)
    proc = subprocess.run(
        [exe, "--stdout", "--stdin", "-b", "1", "-v", voice, "-s", str(int(speed_wpm)),
         "-p", str(int(pitch))],
        input=text.encode("utf-8"), capture_output=True, timeout=60, check=False)
    err = proc.stderr.decode("utf-8", "replace").strip()
    if proc.returncode != 0 or len(proc.stdout) <= 44 or err:
        raise RuntimeError(f"espeak-ng -v {voice} failed (exit {proc.returncode}): "
                           f"{err or 'no audio'}")
    rate, samples = _parse_wav(proc.stdout)
    return resample(samples, rate, ASR_RATE)


@functools.cache
def _espeak_names(exe: str) -> tuple[frozenset[str], frozenset[str]]:
    """(voice names: languages, voice names and files; variant names), lower case."""
    voices: set[str] = set()
    variants: set[str] = set()
    for arg, names in (("--voices", voices), ("--voices=variant", variants)):
        listing = subprocess.run([exe, arg], capture_output=True, text=True, timeout=60,
                                 check=False).stdout
        for line in listing.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 5:
                names.update(f.lower() for f in (fields[1], fields[3], fields[4]))
                names.add(fields[4].rsplit("/", 1)[-1].lower())
    return frozenset(voices), frozenset(variants)


def _check_voice(exe: str, voice: str) -> None:
    """espeak-ng falls back to its default voice for an unknown name, silently."""
    voices, variants = _espeak_names(exe)
    name, _, variant = voice.lower().partition("+")
    if name not in voices or (variant and variant not in variants):
        raise RuntimeError(f"espeak-ng has no voice {voice!r} (espeak-ng --voices lists the "
                           "voices, --voices=variant the +variants)")


def _parse_wav(data: bytes) -> tuple[int, npt.NDArray[np.int16]]:
    """A 16-bit mono WAV from a pipe: the sizes in its header may be wrong (espeak-ng
    writes them before it knows the length), so the data runs to the end."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError("espeak-ng did not write a WAV file")
    pos, rate = 12, 0
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if chunk == b"fmt ":
            channels, rate, _, _, bits = struct.unpack("<HIIHH", data[pos + 10:pos + 24])
            if channels != 1 or bits != 16:
                raise RuntimeError(f"espeak-ng wrote {channels} channels of {bits} bits")
        elif chunk == b"data":
            body = data[pos + 8:]
            body = body[:len(body) // 2 * 2]
            if not rate:
                raise RuntimeError("espeak-ng's WAV has no fmt chunk")
            return rate, np.frombuffer(body, dtype="<i2").astype(np.int16)
        pos += 8 + size + (size & 1)
    raise RuntimeError("espeak-ng's WAV has no data chunk")


# --------------------------------------------------------------------------- levels, noise


def active_level(audio: npt.ArrayLike, frame: int = 320, floor_db: float = 40.0) -> float:
    """Mean power of the frames (20 ms) within ``floor_db`` of the loudest one: the
    speech's level without its pauses (a rough ITU-T P.56 active level)."""
    x = to_float32(audio).reshape(-1).astype(np.float64)
    if not len(x):
        return 0.0
    count = max(1, len(x) // frame)
    frames = x[:count * frame].reshape(count, -1) if len(x) >= frame else x[None, :]
    power = np.mean(frames**2, axis=1)
    top = float(power.max())
    if top <= 0:
        return 0.0
    return float(power[power >= top * 10 ** (-floor_db / 10)].mean())


def level_dbfs(audio: npt.ArrayLike) -> float:
    """:func:`active_level` in dB relative to a full-scale square wave."""
    power = active_level(audio)
    return 10 * math.log10(power) if power > 0 else -math.inf


def set_level(audio: npt.ArrayLike, dbfs: float) -> FloatArray:
    """``audio`` scaled so that its active level is ``dbfs`` (clipped to [-1, 1])."""
    x: FloatArray = to_float32(audio).reshape(-1)
    power = active_level(x)
    if power <= 0:
        return np.array(x, dtype=np.float32)
    gain = math.sqrt(10 ** (dbfs / 10) / power)
    scaled: FloatArray = np.clip(x * gain, -1.0, 1.0).astype(np.float32)
    return scaled


def noise(kind: str, samples: int, seed: int = 0,
          source: npt.ArrayLike | None = None) -> FloatArray:
    """``samples`` of unit-power noise: ``white``; ``pink`` (1/f power, like a fan or
    distant traffic); ``babble``: six talkers at once, cut at random places from
    ``source`` (speech, e.g. a corpus), or without one, pink noise under a random
    syllable-rate (2-6 Hz) envelope, a speech-shaped stand-in."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind {kind!r}: expected one of {', '.join(NOISE_KINDS)}")
    rng = np.random.default_rng(seed)
    if samples <= 0:
        return np.zeros(0, dtype=np.float32)
    out: npt.NDArray[np.float64]
    if kind == "white":
        out = rng.standard_normal(samples)
    elif kind == "pink" or source is None:
        out = _pink(rng, samples)
        if kind == "babble":
            out *= _syllable_envelope(rng, samples)
    else:
        speech = to_float32(source).reshape(-1).astype(np.float64)
        if len(speech) < ASR_RATE:
            raise ValueError("babble needs at least a second of source speech")
        out = np.zeros(samples)
        for _ in range(6):
            start = int(rng.integers(0, len(speech)))
            talker = np.resize(np.roll(speech, -start), samples)  # loops if too short
            level = active_level(talker)
            out += talker / math.sqrt(level) if level > 0 else 0.0
    power = float(np.mean(out**2))
    scaled: FloatArray = (out / math.sqrt(power) if power > 0 else out).astype(np.float32)
    return scaled


def _pink(rng: np.random.Generator, samples: int) -> npt.NDArray[np.float64]:
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    freqs = np.fft.rfftfreq(samples, 1 / ASR_RATE)
    shape = np.ones_like(freqs)
    shape[1:] = 1 / np.sqrt(np.maximum(freqs[1:], 20.0))  # flat below 20 Hz
    shape[0] = 0.0
    return np.fft.irfft(spectrum * shape, samples)


def _syllable_envelope(rng: np.random.Generator, samples: int) -> npt.NDArray[np.float64]:
    t = np.arange(samples) / ASR_RATE
    env = np.zeros(samples)
    for _ in range(4):  # several talkers: the envelope never quite reaches zero
        rate = rng.uniform(2.0, 6.0)
        env += 0.5 + 0.5 * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
    return env / 4


def add_noise(audio: npt.ArrayLike, snr_db: float, seed: int = 0, kind: str = "pink",
              source: npt.ArrayLike | None = None) -> FloatArray:
    """``audio`` plus ``kind`` noise (see :func:`noise`) whose power is ``snr_db`` below
    the speech's active level; clipped to [-1, 1]. ``snr_db=inf`` adds nothing."""
    x: FloatArray = to_float32(audio).reshape(-1)
    if math.isinf(snr_db) and snr_db > 0:
        return np.array(x, dtype=np.float32)
    power = active_level(x)
    n = noise(kind, len(x), seed, source)
    mixed = x + n * math.sqrt(power * 10 ** (-snr_db / 10))
    clipped: FloatArray = np.clip(mixed, -1.0, 1.0).astype(np.float32)
    return clipped


def pad(audio: npt.ArrayLike, before_s: float = 0.5, after_s: float = 0.5) -> FloatArray:
    """``audio`` with silence before and after."""
    x = to_float32(audio).reshape(-1)
    padded: FloatArray = np.concatenate([np.zeros(int(before_s * ASR_RATE), np.float32), x,
                                         np.zeros(int(after_s * ASR_RATE), np.float32)])
    return padded


def speech_bounds(audio: npt.ArrayLike, floor_db: float = 35.0,
                  frame: int = 160) -> tuple[int, int]:
    """(first, last + 1) sample of the frames (10 ms) within ``floor_db`` of the loudest
    one: where the speech starts and ends in a clean clip."""
    x = to_float32(audio).reshape(-1).astype(np.float64)
    count = len(x) // frame
    if count == 0:
        return 0, len(x)
    power = np.mean(x[:count * frame].reshape(count, frame) ** 2, axis=1)
    loud = np.flatnonzero(power >= power.max() * 10 ** (-floor_db / 10))
    return int(loud[0]) * frame, int(loud[-1] + 1) * frame


# --------------------------------------------------------------------------- cache


def cache_dir(name: str = "wakeword") -> Path:
    """``$XDG_CACHE_HOME/jarvis-bench/<name>`` (else ``~/.cache/...``), created."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = str(Path.home() / ".cache")
    path = Path(base) / "jarvis-bench" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(*parts: object) -> str:
    """A short stable file name for what ``parts`` describe."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:20]


def cached_audio(directory: Path, key: str, make: Callable[[], FloatArray]) -> FloatArray:
    """``directory/key.npy`` if it exists, else ``make()`` saved there (atomically)."""
    path = directory / f"{key}.npy"
    if path.is_file():
        try:
            loaded: FloatArray = np.load(path).astype(np.float32, copy=False)
            return loaded
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # a torn or foreign file: make it again
    audio = to_float32(make()).reshape(-1)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, audio)
    os.replace(tmp, path)
    return audio


# --------------------------------------------------------------------------- corpus text

WAKE_PHRASE = "Hey Jarvis"

WAKE_REQUESTS: tuple[str, ...] = (
    "what time is it", "turn on the kitchen lights", "set a timer for ten minutes",
    "what's the weather like tomorrow", "play some jazz in the living room",
    "lock the front door", "turn the heating up a bit", "add eggs to the shopping list",
    "how long until the pasta is done", "dim the bedroom lights", "is the garage door closed",
    "remind me to call mum at six", "stop the music", "what's on my calendar today",
    "turn off all the lights", "how warm is it outside", "start the robot vacuum",
    "open the blinds", "what's the news", "tell me a joke", "set an alarm for seven",
    "pause the movie", "how do I boil an egg", "switch on the fan", "good morning",
    "make the lights blue", "what's two plus two", "read my messages",
    "call the plumber tomorrow", "volume down please",
)
"""Requests said after the wake phrase, in the same breath."""

NEAR_MISSES: tuple[str, ...] = (
    "Hey jar, can you open this?", "Hey Travis, what time is it?", "Jarvis is a name.",
    "The harvest was good this year.", "Hey Charles, turn it off.", "Harvey, are you there?",
    "Hey Marvin, come over here.", "Hey, jars of jam are on the shelf.",
    "Say hey to Jarvis for me.", "Jarvis.", "Jarvis, what time is it?", "Hey Carvis.",
    "Hey Janice, what time is it?", "Hey, just a minute.", "I saw Jarvis yesterday.",
    "Hey Chavez!", "Hey service desk.", "Hey Davis, dinner is ready.",
    "Hey Jarrod, it's late.", "Hey Mavis, let's go.", "Hey Jeeves, where is my tea?",
    "Hey Garvey.", "Harvest festival starts on Sunday.", "Hey, Jarvis Cocker is on the radio.",
    "Good night Jarvis.", "Hey, are we there yet?", "Hey, that's my jacket.",
    "Hey Jessica, have you seen this?", "Hey Harvey, pass the salt.", "Jarvis was a butler.",
    "Hey, jazz is on tonight.", "Hey Gervais, nice show.", "Hey, service is slow here.",
    "The javelin throw is next.", "Hey Marcus, hurry up.", "Hey travel agent.",
)
"""Phrases that sound a little like the wake phrase (or contain "Jarvis" without
"hey"), none of which should wake it. Some do, on some voices: see the bench."""

_EVERYDAY: tuple[str, ...] = (
    "Can you pass me the remote?", "Dinner will be ready in about twenty minutes.",
    "I think it's going to rain later.", "Did anyone feed the cat this morning?",
    "The dishwasher is making that noise again.", "Let's watch something funny tonight.",
    "Where did I put my keys?", "We're out of milk and bread.",
    "The kids have a football match on Saturday.", "Turn that down, I'm on the phone.",
    "Have you seen my glasses anywhere?", "The traffic was terrible on the way home.",
    "I'll take the bins out after dinner.", "It's your turn to do the washing up.",
    "The plumber said he'd come on Tuesday.", "Shall we order a pizza?",
    "My mother is coming to stay next week.", "The garden needs watering.",
    "Don't forget your lunch box.", "I can't find the charger for my phone.",
    "That film was much better than I expected.", "We need to book the holiday soon.",
    "The baby finally fell asleep.", "Could you close the window, it's cold.",
    "I've got a meeting at nine tomorrow.", "The heating has been off all day.",
    "Who left the lights on in the hall?", "Let's go for a walk after lunch.",
    "The dog needs to go to the vet.", "I'm going to bed, good night.",
    "Have you paid the electricity bill?", "There's a parcel on the doorstep.",
    "Tea or coffee?", "The oven takes ages to warm up.", "I love this song.",
    "What do you want for breakfast?", "Please put your shoes away.",
    "The internet is really slow tonight.", "Grandma called while you were out.",
    "The car needs new tyres.", "I'm making soup for lunch.",
    "Your homework is on the kitchen table.", "It's been a very long week.",
    "The neighbours are having a party.", "Can you help me carry the shopping?",
    "I'll be back in ten minutes.", "The match starts at eight.",
    "Do we have any batteries?", "The washing machine has finished.",
    "Let's paint the spare room blue.", "Remember to lock the back door.",
    "That was a lovely meal, thank you.", "Is it still raining outside?",
    "I need to renew my passport.", "The bus was late again this morning.",
    "We should invite the Smiths round.", "My back is killing me today.",
    "Put the kettle on, would you?", "The fridge is nearly empty.",
    "I'm trying to read, please be quiet.", "What time does the shop close?",
    "The cat is sleeping on my coat again.", "Let's have a barbecue on Sunday.",
    "Can you pick up the kids from school?", "I think the milk has gone off.",
    "The new series starts next Friday.", "Who wants the last biscuit?",
    "I left my umbrella on the train.", "We're running late, hurry up.",
    "The printer is out of ink.", "It's too hot to sleep.",
    "The power went off for an hour yesterday.", "Let's tidy up before the guests arrive.",
)

_TV: tuple[str, ...] = (
    "And now, the weather for the week ahead.", "Tonight's top story comes from the capital.",
    "Scientists have discovered a new species of frog.", "The minister declined to comment.",
    "Shares rose sharply in early trading.", "Heavy snow is expected in the north.",
    "The home side scored twice in the second half.", "Stay tuned, more after the break.",
    "This programme contains some strong language.", "Previously, on the show.",
    "The detective examined the broken window.", "I never want to see you again.",
    "Welcome back to the kitchen, today we're baking bread.",
    "Add a pinch of salt and stir gently.", "The lions rest in the shade of the trees.",
    "The final round begins now.", "Congratulations, you've won the car!",
    "Police are appealing for witnesses.", "The museum reopens after five years.",
    "Interest rates remain unchanged this month.", "The match ended in a draw.",
    "Our reporter is live at the scene.", "The storm caused flooding along the coast.",
    "Let's take a look at the traffic.", "It's a goal! What a finish!",
    "Thousands gathered for the concert in the park.", "The trial continues tomorrow.",
    "The election results will be announced at midnight.",
    "Don't touch that dial.", "The captain lifts the trophy.",
    "Record temperatures were recorded across the south.",
    "Call now and get a second one free.", "Terms and conditions apply.",
    "The spaceship drifted silently towards the moon.", "Run! They're right behind us!",
    "Who's there? Show yourself.", "The treasure was buried under the old oak tree.",
    "He's been missing for three days.", "That's all from us tonight, good night.",
    "The prime minister arrived in Paris this morning.",
    "The company announced record profits.", "Temperatures will drop below freezing.",
    "The orchestra played to a packed hall.", "She crossed the finish line in first place.",
    "The bridge will be closed for repairs.", "Our next guest needs no introduction.",
    "Put your hands together for the band.", "Mix the flour and the butter.",
    "The volcano has been quiet for a century.", "In other news, a cat was rescued from a tree.",
)

_SUBJECTS = ("My sister", "The man next door", "Our teacher", "Your brother", "The doctor",
             "Tom", "Sarah", "The postman", "Grandad", "The boss", "Emma", "James")
_VERBS = ("said", "thinks", "told me", "heard", "wrote", "is sure")
_CLAUSES = (
    "the shop closes early on Sundays", "the train will be late tomorrow",
    "the new café serves great coffee", "it will snow this weekend",
    "the garden looks lovely this year", "the film starts at half past seven",
    "the roof needs fixing before winter", "the car park is full again",
    "the concert was sold out", "the library has moved to the high street",
    "the price of petrol went up", "the school trip is next Thursday",
    "the new neighbours have two dogs", "the bakery sells fresh bagels",
    "the meeting was cancelled", "the bridge is closed for repairs",
)


def everyday_sentences(count: int = 400, seed: int = 0) -> list[str]:
    """``count`` ordinary sentences without the wake phrase: household talk, TV and
    radio lines, and "<someone> said <something>" combinations for variety (shuffled,
    reproducible; repeats only when ``count`` exceeds the ~1,300 distinct ones)."""
    rng = np.random.default_rng(seed)
    combos = [f"{s} {v} {c}." for s in _SUBJECTS for v in _VERBS for c in _CLAUSES]
    order = rng.permutation(len(combos))
    base = list(_EVERYDAY) + list(_TV)
    pool = base + [combos[i] for i in order[:max(0, count - len(base))]]
    out = [pool[i] for i in rng.permutation(len(pool))]
    while len(out) < count:
        out += out[:count - len(out)]
    return out[:count]
