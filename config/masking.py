"""Credentials out of anything shown: logs, status hashes, error messages, the demo's panel.

``mask_url`` replaces the password of a URL (every host's, in a multi-host URL such as
``redis+sentinel://u:p@h1:1,h2:2/svc``) and the value of each secret-looking query
parameter (``access_token``, ``api_key``, ``password``, …) with ``***``. ``mask_secrets``
does that to every URL inside a free text (an exception's message, say).
"""

from __future__ import annotations

import re

MASK = "***"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)(.*)$", re.DOTALL)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_PARAM = re.compile(r"(^|[?&;])([^=&;#]+)=([^&;#]*)")
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|key|auth|credential|signature|^sig$", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with its passwords and secret query values replaced by ``***``; a text that
    is not a URL is returned as it is."""
    match = _URL.match(url)
    if match is None:
        return url
    scheme, netloc, rest = match.groups()
    if "@" not in netloc and "@" in rest:
        # a password with a raw '/', '?' or '#' ends the authority early for a parser: all
        # up to the last '@' may be credentials (a query's '@' masks too much, never too little)
        return mask_url(f"{scheme}{MASK}@{rest.rpartition('@')[2]}")
    hosts = []
    for host in netloc.split(","):
        userinfo, at, address = host.rpartition("@")
        if at:
            user, colon, _ = userinfo.partition(":")
            userinfo = f"{user}:{MASK}" if colon else MASK  # a lone userinfo may be the password
            host = f"{userinfo}@{address}"
        hosts.append(host)
    path, hash_mark, fragment = rest.partition("#")
    if "?" in path:
        before, _, query = path.partition("?")
        path = f"{before}?{_mask_query(query)}"
    return f"{scheme}{','.join(hosts)}{path}{hash_mark}{fragment}"


def _mask_query(query: str) -> str:
    def masked(match: re.Match[str]) -> str:
        lead, name, value = match.groups()
        return f"{lead}{name}={MASK}" if value and _SECRET_NAME.search(name) else match.group(0)

    return _PARAM.sub(masked, query)


def mask_secrets(text: str) -> str:
    """``text`` with every URL in it masked (see ``mask_url``)."""
    return _URL_IN_TEXT.sub(lambda match: mask_url(match.group(0)), text)
