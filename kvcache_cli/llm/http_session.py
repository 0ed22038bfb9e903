"""A ``requests`` session that reads the environment's HTTP settings once, not per request.

With ``trust_env`` on (the default), ``requests`` looks up the proxy variables (walking
the whole environment twice), ``no_proxy``, the CA bundle variables and ``~/.netrc``
on every request: milliseconds per call that a live turn pays several times. The
settings cannot change while kvcache runs, so :func:`session_for` resolves them once
for the server URLs the session talks to and turns the per-request lookup off. When
the URLs would get different settings (one behind a proxy, one not), the session
keeps the per-request lookup.
"""

from __future__ import annotations

import os
from typing import Any


def session_for(urls: list[str]) -> Any:
    """A ``requests.Session`` for requests to ``urls`` (server bases), the
    environment's proxies, CA bundle and ``.netrc`` credentials resolved now."""
    import requests
    from requests.utils import get_environ_proxies, get_netrc_auth

    session = requests.Session()
    settings = [(get_environ_proxies(url), get_netrc_auth(url)) for url in urls]
    if not settings or any(s != settings[0] for s in settings[1:]):
        return session
    proxies, netrc_auth = settings[0]
    session.proxies.update(proxies)
    if netrc_auth is not None:
        session.auth = netrc_auth
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False
    return session
