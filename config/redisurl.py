"""``redis+sentinel://`` URLs: where the sentinels are and which service they watch.

    redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]

The credentials are those of the primary and its replicas (the sentinels are asked
without them); a sentinel's port defaults to 26379. Pure: values in, values out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
_SERVICE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None

    def node_url(self, host: str, port: int) -> str:
        """A ``redis://`` URL of one server of the service, with the credentials and db."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or 'default', safe='')}:{quote(self.password, safe='')}@"
        elif self.username:
            auth = f"{quote(self.username, safe='')}@"
        return f"redis://{auth}{_host(host)}:{port}/{self.db}"

    def redacted(self) -> str:
        """The URL without the password (for logs and status)."""
        auth = f"{self.username or ''}:***@" if self.password is not None else ""
        hosts = ",".join(f"{_host(h)}:{p}" for h, p in self.sentinels)
        return f"{SCHEME}://{auth}{hosts}/{self.service}/{self.db}"


def is_sentinel_url(url: str) -> bool:
    return url.lower().startswith(SCHEME + "://")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a ``redis+sentinel://`` URL; raises ValueError saying what is wrong (never
    quoting the password)."""
    if not is_sentinel_url(url):
        raise ValueError(f"a sentinel URL starts with {SCHEME}://")
    rest = url[len(SCHEME) + 3 :]
    if "?" in rest or "#" in rest:
        raise ValueError("a sentinel URL takes no query or fragment")
    netloc, slash, path = rest.partition("/")
    auth, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = auth.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if not colon:  # "secret@" alone: redis-py reads it as a password, so do we
            username, password = None, unquote(user)
    if not hosts:
        raise ValueError("a sentinel URL names at least one sentinel as host:port")
    sentinels = tuple(_address(item) for item in hosts.split(","))
    segments = path.split("/") if slash else []
    if segments and segments[-1] == "" and len(segments) > 1:
        segments.pop()  # a trailing slash
    if not segments or not segments[0]:
        raise ValueError("a sentinel URL names the service after the hosts: redis+sentinel://host:port/service_name")
    service = unquote(segments[0])
    if not _SERVICE.match(service):
        raise ValueError(f"service name {service!r} is not 1-128 letters, digits or '_.:-'")
    db = 0
    if len(segments) > 2:
        raise ValueError("a sentinel URL's path is /service_name[/db], nothing more")
    if len(segments) == 2:
        if not _digits(segments[1]) or int(segments[1]) > 15_999:
            raise ValueError(f"database {segments[1]!r} is not a number (the path is /service_name[/db])")
        db = int(segments[1])
    return SentinelURL(sentinels, service, db, username, password)


def _address(item: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, bracket, port = item[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise ValueError(f"sentinel address {item!r} is not [IPv6]:port")
        port = port[1:]
    else:
        host, _, port = item.partition(":")
    if not host:
        raise ValueError(f"sentinel address {item!r} has no host")
    if not port:
        return host, DEFAULT_SENTINEL_PORT
    if not _digits(port) or not 0 < int(port) < 65536:
        raise ValueError(f"sentinel address {item!r}: port {port!r} is not a number from 1 to 65535")
    return host, int(port)


def _digits(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes '²', which ``int`` refuses."""
    return text.isascii() and text.isdigit()
