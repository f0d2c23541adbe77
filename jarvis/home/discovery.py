"""Home Assistant MQTT discovery: the config messages that make Jarvis appear in Home
Assistant as one device with latency sensors, listening/speaking binary sensors, a mute
switch, a text entity to ask, a cancel button and its last reply and transcript.

Each message goes, retained, to ``<prefix>/<component>/<node>/<object>/config``; all
share the ``device`` block and ``<base>/availability``. The bridge publishes them on
every connect and again whenever ``<prefix>/status`` says ``online`` (Home Assistant
restarted).
"""

from __future__ import annotations

import re
from typing import Any

from jarvis.home.schema import Topics

_DURATION = {"device_class": "duration", "state_class": "measurement",
             "unit_of_measurement": "s", "suggested_display_precision": 3}


def node_id(client_id: str) -> str:
    """The discovery node id: the client id with anything but [A-Za-z0-9_-] replaced."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", client_id) or "jarvis"


def discovery_messages(topics: Topics, *, client_id: str, site: str,
                       version: str) -> list[tuple[str, dict[str, Any]]]:
    """(topic, config) for every entity; empty when discovery is off."""
    prefix = topics.discovery_prefix
    if not prefix:
        return []
    node = node_id(client_id)
    common: dict[str, Any] = {
        "availability_topic": topics.availability,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": {
            "identifiers": [node],
            "name": f"Jarvis {site}",
            "manufacturer": "Jarvis",
            "model": "Offline voice assistant",
            "sw_version": version,
        },
        "origin": {"name": "jarvis", "sw_version": version},
    }

    def metric(key: str) -> str:
        return f"{{{{ value_json.{key} }}}}"

    entities: list[tuple[str, str, dict[str, Any]]] = [
        ("sensor", "latency_mean", {"name": "Latency mean", "state_topic": topics.metrics,
                                    "value_template": metric("mean_s"), **_DURATION}),
        ("sensor", "latency_p95", {"name": "Latency p95", "state_topic": topics.metrics,
                                   "value_template": metric("p95_s"), **_DURATION}),
        ("sensor", "latency_std", {"name": "Latency std", "state_topic": topics.metrics,
                                   "value_template": metric("std_s"), **_DURATION}),
        ("sensor", "cache_hit_rate", {
            "name": "Cache hit rate", "state_topic": topics.metrics,
            "value_template": "{% if value_json.cache_hit_rate is number %}"
                              "{{ (value_json.cache_hit_rate * 100) | round(1) }}"
                              "{% else %}None{% endif %}",
            "state_class": "measurement", "unit_of_measurement": "%",
            "icon": "mdi:cached"}),
        ("sensor", "latency_spikes", {"name": "Latency spikes", "state_topic": topics.metrics,
                                      "value_template": metric("spikes"),
                                      "state_class": "measurement",
                                      "icon": "mdi:chart-bell-curve"}),
        ("sensor", "state", {"name": "State", "state_topic": topics.state,
                             "device_class": "enum", "options": ["idle", "listening",
                                                                 "thinking", "speaking"]}),
        ("binary_sensor", "listening", {
            "name": "Listening", "state_topic": topics.state,
            "value_template": "{{ 'ON' if value == 'listening' else 'OFF' }}",
            "payload_on": "ON", "payload_off": "OFF", "icon": "mdi:microphone"}),
        ("binary_sensor", "speaking", {
            "name": "Speaking", "state_topic": topics.state,
            "value_template": "{{ 'ON' if value == 'speaking' else 'OFF' }}",
            "payload_on": "ON", "payload_off": "OFF", "icon": "mdi:account-voice"}),
        ("switch", "mute", {
            "name": "Mute microphone", "command_topic": f"{topics.cmd_prefix}mute",
            "payload_on": '{"mute": true}', "payload_off": '{"mute": false}',
            "state_topic": topics.muted, "state_on": "ON", "state_off": "OFF",
            "icon": "mdi:microphone-off"}),
        ("text", "ask", {
            "name": "Ask", "command_topic": f"{topics.cmd_prefix}ask",
            "command_template": '{"text": {{ value | tojson }}, "speak": true}',
            "min": 1, "max": 255, "mode": "text", "icon": "mdi:chat-question"}),
        ("button", "cancel", {"name": "Cancel reply", "command_topic": f"{topics.cmd_prefix}cancel",
                              "payload_press": "{}", "icon": "mdi:stop"}),
        ("sensor", "last_reply", {"name": "Last reply", "state_topic": topics.reply,
                                  "value_template": "{{ value_json.text[:250] }}",
                                  "icon": "mdi:message-reply-text"}),
        ("sensor", "last_transcript", {"name": "Last transcript", "state_topic": topics.transcript,
                                       "value_template": "{{ value_json.text[:250] }}",
                                       "icon": "mdi:text-to-speech"}),
    ]
    return [
        (f"{prefix}/{component}/{node}/{object_id}/config",
         {**config, "unique_id": f"{node}_{object_id}", **common})
        for component, object_id, config in entities
    ]


def room_discovery_messages(topics: Topics, room: str, *, client_id: str,
                            version: str) -> list[tuple[str, dict[str, Any]]]:
    """(topic, config) for a room's entities: a device of its own ("Jarvis <room>",
    reached through the hub) with its state, listening/speaking, last transcript and
    last reply; available while both the hub and the room's satellite are."""
    prefix = topics.discovery_prefix
    if not prefix:
        return []
    hub = node_id(client_id)
    node = f"{hub}_room_{room}"
    common: dict[str, Any] = {
        "availability": [{"topic": topics.availability},
                         {"topic": topics.room(room, "availability")}],
        "availability_mode": "all",
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": {"identifiers": [node], "name": f"Jarvis {room}",
                   "manufacturer": "Jarvis", "model": "Wyoming satellite (room)",
                   "sw_version": version, "via_device": hub, "suggested_area": room},
        "origin": {"name": "jarvis", "sw_version": version},
    }
    state = topics.room(room, "state")
    entities: list[tuple[str, str, dict[str, Any]]] = [
        ("sensor", "state", {"name": "State", "state_topic": state, "device_class": "enum",
                             "options": ["idle", "listening", "thinking", "speaking"]}),
        ("binary_sensor", "listening", {
            "name": "Listening", "state_topic": state,
            "value_template": "{{ 'ON' if value == 'listening' else 'OFF' }}",
            "payload_on": "ON", "payload_off": "OFF", "icon": "mdi:microphone"}),
        ("binary_sensor", "speaking", {
            "name": "Speaking", "state_topic": state,
            "value_template": "{{ 'ON' if value == 'speaking' else 'OFF' }}",
            "payload_on": "ON", "payload_off": "OFF", "icon": "mdi:account-voice"}),
        ("sensor", "last_transcript", {"name": "Last transcript",
                                       "state_topic": topics.room(room, "transcript"),
                                       "value_template": "{{ value_json.text[:250] }}",
                                       "icon": "mdi:text-to-speech"}),
        ("sensor", "last_reply", {"name": "Last reply",
                                  "state_topic": topics.room(room, "reply"),
                                  "value_template": "{{ value_json.text[:250] }}",
                                  "icon": "mdi:message-reply-text"}),
    ]
    return [
        (f"{prefix}/{component}/{node}/{object_id}/config",
         {**config, "unique_id": f"{node}_{object_id}", **common})
        for component, object_id, config in entities
    ]
