"""Jarvis over the Wyoming protocol: a server for Home Assistant's voice stack (and any
Wyoming client), the hub driving satellites, and a satellite of its own.

::

    protocol.py   the wire format, read strictly (errors say what was wrong)
    info.py       what ``describe`` is answered with: asr, tts, handle
    asr.py        an audio stream in any PCM format → 16 kHz mono for whisper
    tts.py        ``synthesize`` and the ``synthesize-start/-chunk/-stop`` stream
    handle.py     ``transcript`` → a Turn for the one responder → ``handled``
    handler.py    one connection: events in, answers out, bad input refused
    server.py     the listening socket, connections, zeroconf; start_wyoming()
    zeroconf.py   mDNS advertisement so Home Assistant discovers the server

    rooms.py      the hub's rooms: one per satellite (JARVIS_SATELLITES, zeroconf)
    room.py       one room: its satellite driven as Home Assistant would, its turns
    room_audio.py a room's microphone: any PCM → 16 kHz mono, never faster than real time
    room_sink.py  a room's speaker: replies paced to the satellite, the echo reference

    satellite.py  ``jarvis satellite``: a microphone and speaker as a Wyoming satellite
                  (the protocol, one controller at a time, the microphone stream)
    satellite_playback.py  the replies a controller sends, played in turn → ``played``

This package sits beside :mod:`jarvis.home` (neither imports the other): device
commands reach MQTT through the responder's actuator, which the MQTT bridge sets when
the entry point runs one.
"""
