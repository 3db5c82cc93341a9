"""Every route x credential x path spelling x method: only the public pages answer
without the right token, and the right token always gets through."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from urllib.parse import quote, unquote, urlsplit

import pytest

from foreman.daemon import Daemon

TOKEN = "matrix-Token-1234567890"
BAD_CREDENTIALS = {
    "none": {},
    "wrong": {"Authorization": "Bearer not-the-token"},
    "empty bearer": {"Authorization": "Bearer "},
    "other scheme": {"Authorization": f"Basic {TOKEN}"},
    "prefix": {"Authorization": f"Bearer {TOKEN[:-3]}"},
    "bare token": {"Authorization": TOKEN},
}
METHODS = ("GET", "HEAD", "POST", "OPTIONS")


def spellings(path: str) -> dict[str, str]:
    return {
        "exact": path,
        "trailing slash": path.rstrip("/") + "/",
        "doubled slash": "/" + path,
        "upper case": path.upper(),
        "percent-encoded": "/" + "".join(f"%{ord(c):02X}" for c in path[1:3]) + path[3:],
        "dot-dot": "/x/.." + path,
        "encoded slash": path.replace("/", "%2F", 2) if path.count("/") > 1 else path + "%2F",
    }


def concrete_paths(daemon: Daemon) -> list[str]:
    samples = {"digest": "sha256:abc", "model": "llama3", "job_id": "abc"}
    paths = set()
    for rule in daemon.app._map.iter_rules():
        path = rule.rule
        for name, value in samples.items():
            path = path.replace(f"<{name}>", value).replace(f"<path:{name}>", value)
        paths.add(path)
    return sorted(paths)


def request(conn: http.client.HTTPConnection, method: str, path: str,
            headers: dict[str, str], query: str = "") -> int:
    conn.putrequest(method, path + query, skip_accept_encoding=True)
    for name, value in headers.items():
        conn.putheader(name, value)
    body = b"{}" if method == "POST" else None
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    response.read()
    return response.status


@pytest.mark.parametrize("metrics_public", [False, True])
def test_auth_matrix(make_foreman: Callable[..., Daemon], metrics_public: bool) -> None:
    daemon = make_foreman(token=TOKEN, metrics={"public": metrics_public})
    public = {"/healthz", "/status"} | ({"/metrics"} if metrics_public else set())
    parts = urlsplit(daemon.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
    checked = 0
    leaks = []
    try:
        for route in concrete_paths(daemon):
            for spelling, path in spellings(route).items():
                for method in METHODS:
                    is_public = method in ("GET", "HEAD") and unquote(path) in public \
                        and "//" not in path
                    for name, headers in BAD_CREDENTIALS.items():
                        status = request(conn, method, path, headers)
                        if (status == 401) == is_public:
                            leaks.append((route, spelling, method, name, status))
                        checked += 1
                    status = request(conn, method, path, {}, f"?token={quote(TOKEN)}")
                    if (status == 401) == is_public:
                        leaks.append((route, spelling, method, "query token", status))
                    status = request(conn, method, path, {"Authorization": f"Bearer {TOKEN}"})
                    if status == 401:
                        leaks.append((route, spelling, method, "right token refused", status))
                    checked += 2
    finally:
        conn.close()
    print(f"{checked} requests checked")
    assert checked > 4000
    assert leaks == []


def test_a_non_ascii_token_authenticates_as_sent(make_foreman: Callable[..., Daemon],
                                                 fake) -> None:
    """Regression (issue 13.14): the header arrives decoded as latin-1 and was compared
    re-encoded as UTF-8, so a UTF-8 token could never match.  The target token goes out
    as its UTF-8 bytes too."""
    token, target_token = "pässwörd-ключ-🔑", "sésame-ключ"
    fake.token = target_token
    daemon = make_foreman(token=token, target={"token": target_token})
    parts = urlsplit(daemon.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        for supplied, wanted in ((token, 200), (token[:-1], 401), ("passwort", 401)):
            conn.putrequest("POST", "/api/chat", skip_accept_encoding=True)
            conn.putheader("Authorization", b"Bearer " + supplied.encode())
            body = b'{"model": "llama3", "stream": false}'
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            assert (response.status, supplied) == (wanted, supplied), response.read()
            response.read()
    finally:
        conn.close()
