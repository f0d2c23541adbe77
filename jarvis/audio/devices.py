"""Sound devices as PortAudio (through ``sounddevice``) sees them, and choosing one by
name or index (``JARVIS_INPUT_DEVICE`` / ``JARVIS_OUTPUT_DEVICE``).

PortAudio is loaded on first use, not at import, and reads the ALSA configuration
(``~/.asoundrc``) once per process at that moment. Every failure is an
:class:`~jarvis.audio.errors.AudioDeviceError` with a one-line explanation; no
PortAudio traceback reaches the user.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any, Literal

from jarvis.audio.errors import AudioDeviceError

Kind = Literal["input", "output"]

_VARIABLE = {"input": "JARVIS_INPUT_DEVICE", "output": "JARVIS_OUTPUT_DEVICE"}

HEADLESS_HINT = (
    "no sound devices found. On a headless machine connect a USB microphone/speaker, or "
    "define an ALSA null or file PCM as pcm.!default in ~/.asoundrc (see README, "
    "'Audio devices'); `jarvis devices` lists what PortAudio sees"
)


def sounddevice() -> Any:
    """The ``sounddevice`` module, or AudioDeviceError if PortAudio cannot be loaded."""
    try:
        import sounddevice as sd
    except OSError as exc:  # raised by sounddevice when libportaudio is missing
        fix = (
            "brew install portaudio" if platform.system() == "Darwin"
            else "sudo apt-get install libportaudio2"
        )
        raise AudioDeviceError(
            f"cannot load the PortAudio library ({exc}); install it: {fix}"
        ) from None
    return sd


@dataclass(frozen=True)
class DeviceInfo:
    """One device as PortAudio reports it."""

    index: int
    name: str
    hostapi: str
    max_input_channels: int
    max_output_channels: int
    default_samplerate: float
    is_default_input: bool = False
    is_default_output: bool = False

    def channels(self, kind: Kind) -> int:
        return self.max_input_channels if kind == "input" else self.max_output_channels

    def label(self) -> str:
        return f"#{self.index} {self.name!r}"


def list_devices() -> list[DeviceInfo]:
    """Every device PortAudio knows; an empty list on a machine with none."""
    sd = sounddevice()
    try:
        raw = sd.query_devices()
        hostapis = sd.query_hostapis()
        default_in, default_out = _defaults(sd)
    except sd.PortAudioError as exc:
        raise AudioDeviceError(f"PortAudio cannot list the sound devices: {exc}") from None
    devices = []
    for entry in raw:
        index = int(entry["index"])
        api = hostapis[entry["hostapi"]]["name"] if entry["hostapi"] < len(hostapis) else "?"
        devices.append(DeviceInfo(
            index=index,
            name=str(entry["name"]),
            hostapi=str(api),
            max_input_channels=int(entry["max_input_channels"]),
            max_output_channels=int(entry["max_output_channels"]),
            default_samplerate=float(entry["default_samplerate"]),
            is_default_input=index == default_in,
            is_default_output=index == default_out,
        ))
    return devices


def _defaults(sd: Any) -> tuple[int, int]:
    pair = sd.default.device
    try:
        return int(pair[0]), int(pair[1])
    except (TypeError, ValueError, IndexError):
        return -1, -1


def resolve_device(spec: str, kind: Kind) -> DeviceInfo:
    """The device ``spec`` names: empty = the system default, digits = an index,
    otherwise an exact name or a unique case-insensitive name substring among
    devices that have ``kind`` channels."""
    variable = _VARIABLE[kind]
    devices = list_devices()
    if not devices:
        raise AudioDeviceError(HEADLESS_HINT)
    usable = [d for d in devices if d.channels(kind) > 0]
    spec = spec.strip()
    if not usable:
        raise AudioDeviceError(
            f"no {kind} device: PortAudio sees {len(devices)} device(s) but none can "
            f"{'record' if kind == 'input' else 'play'} ({_names(devices)})"
        )
    if not spec:
        chosen = [d for d in usable if (d.is_default_input if kind == "input"
                                        else d.is_default_output)]
        if chosen:
            return chosen[0]
        raise AudioDeviceError(
            f"no default {kind} device; set {variable} to one of: {_names(usable)}"
        )
    if spec.lstrip("-").isdigit():
        index = int(spec)
        match = [d for d in devices if d.index == index]
        if not match:
            raise AudioDeviceError(
                f"{variable}={spec}: no device with that index; {kind} devices: {_names(usable)}"
            )
        if match[0].channels(kind) == 0:
            raise AudioDeviceError(
                f"{variable}={spec}: {match[0].label()} has no {kind} channels; "
                f"{kind} devices: {_names(usable)}"
            )
        return match[0]
    exact = [d for d in usable if d.name == spec]
    if exact:
        return exact[0]
    partial = [d for d in usable if spec.lower() in d.name.lower()]
    if len(partial) == 1:
        return partial[0]
    if not partial:
        raise AudioDeviceError(
            f"{variable}={spec!r}: no {kind} device has that in its name; "
            f"{kind} devices: {_names(usable)}"
        )
    raise AudioDeviceError(
        f"{variable}={spec!r} matches {len(partial)} {kind} devices ({_names(partial)}); "
        "use the index or a longer part of the name"
    )


def _names(devices: list[DeviceInfo]) -> str:
    return ", ".join(d.label() for d in devices) or "none"


def supported_rate(device: DeviceInfo, kind: Kind, wanted: int, dtype: str = "int16") -> int:
    """``wanted`` if the device accepts it for mono, else the device's default rate
    (the caller resamples)."""
    sd = sounddevice()
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:
        check(device=device.index, channels=1, dtype=dtype, samplerate=wanted)
        return wanted
    except (sd.PortAudioError, ValueError):
        pass
    fallback = int(device.default_samplerate)
    try:
        check(device=device.index, channels=1, dtype=dtype, samplerate=fallback)
    except (sd.PortAudioError, ValueError) as exc:
        raise AudioDeviceError(
            f"{device.label()} accepts neither {wanted} Hz nor its default {fallback} Hz "
            f"for mono {kind} ({exc}); choose another device with {_VARIABLE[kind]}"
        ) from None
    return fallback
