"""Orchestrator URLs: one parser for every command, and one rule for resolving paths below them.

An orchestrator URL is http:// or https://, a host, an optional port and an optional path: a reverse
proxy may serve the orchestrator under a sub-path (https://example.org/swarm), and that path is kept.
API paths (`/v1/health`) and the paths the orchestrator hands out (`/v1/blobs/...`) are relative to
the orchestrator's root, which is that base URL, so both resolve below its path; a full URL (a blob
store's presigned one) is used as it is.

Try it:
    python -c "from iota_cli.core.urls import *; print(resolve(check('http://h:8/swarm/'), '/v1/health'))"
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

HINT = (
    "give the orchestrator as http(s)://HOST[:PORT][/PATH], e.g. --orchestrator https://swarm.example.org "
    "(or `iota config set orchestrator URL`)"
)


class UrlError(ValueError):
    """An orchestrator URL that cannot be used: why says what is wrong with it, hint how to give one."""

    hint = HINT

    def __init__(self, url: str, why: str) -> None:
        shown = repr(url) if len(url) <= 80 else repr(url[:77] + "...")
        super().__init__(f"{shown} is not an orchestrator URL: {why}")
        self.url, self.why = url, why


def check(raw: str) -> str:
    """raw as an orchestrator base URL (trimmed, no trailing slash), or UrlError saying what is wrong."""
    url = raw.strip()
    if "://" not in url:
        raise UrlError(url, "it needs http:// or https:// and a host")
    if any(c.isspace() for c in url):
        raise UrlError(url, "it has a space in it")
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed [IPv6 address
        raise UrlError(url, "its host is not a host name or IP address") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise UrlError(url, "the scheme must be http or https")
    if not parts.hostname:
        raise UrlError(url, "it has no host")
    if not _valid_host(parts.hostname):
        raise UrlError(url, "its host is not a host name or IP address")
    try:
        port = parts.port  # urlsplit checks the port only when asked for it
    except ValueError:
        port = 0
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        raise UrlError(url, "its port is not a number in 1-65535")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise UrlError(url, "it may not have a ?query or #fragment")
    if parts.username is not None or parts.password is not None:
        # The URL is logged and shown; credentials go in the token, never in the URL.
        raise UrlError(
            f"{parts.scheme}://...@{parts.netloc.rpartition('@')[2]}",
            "it may not carry a user name or password",
        )
    return url.rstrip("/")


def _valid_host(host: str) -> bool:
    """What the HTTP stack will accept as a host: an IP address, or a name whose labels are 1-63 chars."""
    import ipaddress

    if ":" in host:  # urlsplit has taken the brackets off an IPv6 address
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return False
        return True
    try:
        host.rstrip(".").encode("idna")  # the codec refuses empty and over-long labels
    except UnicodeError:
        return False
    return True


def resolve(base: str, path_or_url: str) -> str:
    """Where a request goes: a full URL as it is, a path (with or without its leading /) below base."""
    if urlsplit(path_or_url).scheme or path_or_url.startswith("//"):
        return urljoin(base, path_or_url)
    return base.rstrip("/") + "/" + path_or_url.lstrip("/")
