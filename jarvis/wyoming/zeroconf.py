"""Zeroconf (mDNS) advertisement, so Home Assistant finds the server by itself: a
``_wyoming._tcp.local.`` service named after the site, on the address Home Assistant
should connect to. Failing to advertise is a warning, never a reason not to serve:
Home Assistant can always be given the host and port by hand."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from typing import Any

log = logging.getLogger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."
_MDNS_GROUP = "224.0.0.251"


class Advertiser:
    """Registers one Wyoming service while the server runs."""

    def __init__(self, name: str, port: int, host: str = "") -> None:
        self.name = name
        self.port = port
        self.host = host
        """The address the server is bound to; empty or a wildcard = find this
        machine's address on the local network."""
        self.address = ""
        self._zeroconf: Any = None
        self._info: Any = None

    async def start(self) -> bool:
        """Advertise; False (with a warning) when it cannot be done here."""
        try:
            from zeroconf import NonUniqueNameException
            from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
        except ImportError:
            log.warning("zeroconf is not installed (pip install 'wyoming[zeroconf]'): Home "
                        "Assistant will not discover Jarvis by itself; add it by host and "
                        "port")
            return False
        address = self._address()
        if address is None:
            log.warning("zeroconf: no local network address found; Home Assistant will not "
                        "discover Jarvis by itself (add it by host and port)")
            return False
        info = AsyncServiceInfo(SERVICE_TYPE, f"{self.name}.{SERVICE_TYPE}",
                                addresses=[socket.inet_aton(address)], port=self.port)
        zeroconf = AsyncZeroconf()
        try:
            await zeroconf.async_register_service(info)
        except (NonUniqueNameException, OSError) as exc:
            log.warning("zeroconf: cannot advertise %r on %s:%d (%s); add Jarvis to Home "
                        "Assistant by host and port", self.name, address, self.port,
                        type(exc).__name__)
            await zeroconf.async_close()
            return False
        self._zeroconf, self._info, self.address = zeroconf, info, address
        log.info("zeroconf: advertising %s.%s at %s:%d", self.name, SERVICE_TYPE, address,
                 self.port)
        return True

    async def stop(self) -> None:
        """Withdraw the advertisement (never raises: the network may be gone)."""
        zeroconf, self._zeroconf = self._zeroconf, None
        if zeroconf is None:
            return
        try:
            await zeroconf.async_unregister_service(self._info)
        except Exception as exc:
            log.debug("zeroconf: withdrawing %r failed: %s", self.name, exc)
        finally:
            with contextlib.suppress(Exception):
                await zeroconf.async_close()


    def _address(self) -> str | None:
        """An IPv4 address other machines can reach: the bound one, else the one the
        route to the mDNS group leaves from (no packet is sent)."""
        try:
            bound = ipaddress.ip_address(self.host)
        except ValueError:
            bound = None
        if bound is not None and bound.version == 4 and not bound.is_unspecified:
            return str(bound)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((_MDNS_GROUP, 1))
                address = str(probe.getsockname()[0])
            except OSError:
                return None
        return address if address != "0.0.0.0" else None


async def advertise(name: str, port: int, host: str = "") -> Advertiser | None:
    """An :class:`Advertiser` for ``name`` that is advertising, or None (warned) when
    it cannot be done here."""
    advertiser = Advertiser(name, port, host)
    return advertiser if await advertiser.start() else None
