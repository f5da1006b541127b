"""Rate limits per client address: a token bucket each, so that registering costs time, not nothing.

One bucket per address holds up to `burst` tokens and refills at `rate` tokens a second; a request
takes one, or is told how long until one is there (answered 429 with Retry-After). IPv6 clients share
a bucket per /64, since one host is usually handed a whole /64 and could otherwise take a fresh address
per request. The buckets live in the orchestrator process (a restart refills them) and are touched
only from the event loop, so they need no lock.

Memory stays bounded under a flood from many addresses: a bucket that has refilled is the same as no
bucket and is dropped first; past MAX_ADDRESSES the least recently used ones go (which hands those
addresses a fresh burst: a limit per address cannot stop a swarm of addresses anyway).

Try it: python -c "from iota_orchestrator.ratelimit import *; print([RateLimiter(2, 1).take('a', 0)])"
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict

MAX_ADDRESSES = 65_536


def address_key(host: str | None) -> str:
    """The bucket an address draws from: the address itself, or its /64 for IPv6."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)


class RateLimiter:
    """Token buckets per key; `rate <= 0` turns limiting off."""

    def __init__(self, burst: int, rate: float, max_keys: int = MAX_ADDRESSES) -> None:
        self.burst, self.rate, self.max_keys = max(int(burst), 1), float(rate), max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str, now: float) -> float | None:
        """Take a token for key at time now (monotonic seconds): None if granted, else seconds to wait."""
        if not self.enabled:
            return None
        tokens, then = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(now - then, 0.0) * self.rate)
        granted = tokens >= 1.0
        if granted:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)  # most recently used last
        self._prune(now)
        return None if granted else (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        if len(self._buckets) <= self.max_keys:
            return
        full_after = self.burst / self.rate  # a bucket idle this long has refilled: forgetting it is free
        for key in [k for k, (_, t) in self._buckets.items() if now - t >= full_after]:
            del self._buckets[key]
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


def retry_after(wait_s: float) -> str:
    """Retry-After in whole seconds, never 0: a client told 0 would ask again at once."""
    return str(max(1, math.ceil(wait_s)))
