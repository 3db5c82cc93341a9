"""The two checks Ollama makes at its door against web pages: Origin (CORS) and Host.

A page in the user's browser can send requests to a loopback port; the Origin
check refuses those from origins not allowed (and answers the CORS preflight
of those that are), the Host check refuses a page that reached foreman through
a DNS name it rebound to 127.0.0.1.  Both follow Ollama's rules
(`envconfig.AllowedOrigins`, gin-contrib/cors as Ollama configures it, and
`allowedHostsMiddleware` in `server/routes.go`), extended by `cors.origins`
and `server.allowed_hosts`.  The verdict comes from headers alone, so the
server can give it before a body is read.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Ollama's default origins: loopback names on http(s) with and without a port,
# and the schemes of local apps.  Browser extensions are not among them.
DEFAULT_ORIGINS = (
    *(f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "0.0.0.0")
      for scheme in ("http", "https") for port in ("", ":*")),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)

ALLOWED_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
ALLOWED_HEADERS = ",".join((
    "Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With",
    "Openai-Beta", "X-Stainless-Arch", "X-Stainless-Async", "X-Stainless-Custom-Poll-Interval",
    "X-Stainless-Helper-Method", "X-Stainless-Lang", "X-Stainless-Os",
    "X-Stainless-Package-Version", "X-Stainless-Poll-Helper", "X-Stainless-Retry-Count",
    "X-Stainless-Runtime", "X-Stainless-Runtime-Version", "X-Stainless-Timeout",
    # what browser Anthropic clients send
    "X-Api-Key", "Anthropic-Version", "Anthropic-Beta",
    "Anthropic-Dangerous-Direct-Browser-Access",
))
PREFLIGHT_MAX_AGE = str(12 * 3600)

# Go's netip IsPrivate: the RFC 1918 ranges and IPv6 unique local addresses only.
_PRIVATE = tuple(ipaddress.ip_network(n) for n in
                 ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
_VERDICTS_KEPT = 256  # per kind: a scanner's endless names must not grow them


@dataclass(frozen=True)
class Verdict:
    """What to do with a request: refuse it (403, with why), answer its preflight
    (204), or serve it, adding `headers` to its answer."""

    refusal: str | None = None
    preflight: bool = False
    headers: tuple[tuple[str, str], ...] = ()


SERVE = Verdict()


def is_loopback_listen(host: str) -> bool:
    """Whether foreman listens only on loopback (`localhost` resolves to it)."""
    try:
        return unmapped(ipaddress.ip_address(host)).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(unmapped(ipaddress.ip_address(info[4][0])).is_loopback
                                   for info in infos)


def unmapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address
             ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4-mapped IPv6 address as the IPv4 address it is (Go's netip does the same)."""
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def own_addresses(hostname: str) -> frozenset[str]:
    """The machine's own addresses, as far as the stdlib can tell: those its
    hostname resolves to (Go lists interfaces; Python cannot without a package)."""
    try:
        return frozenset(info[4][0] for info in socket.getaddrinfo(hostname, None))
    except OSError:
        return frozenset()


def _remembered(verdicts: dict[str, bool], value: str, decide: Callable[[str], bool]) -> bool:
    known = verdicts.get(value)
    if known is None:
        known = decide(value)
        if len(verdicts) < _VERDICTS_KEPT:
            verdicts[value] = known
    return known


class Guard:
    def __init__(self, loopback_only: bool, origins: Iterable[str] = (),
                 allowed_hosts: Iterable[str] = (), hostname: str | None = None) -> None:
        """`loopback_only`: foreman listens on loopback, so Host is checked (as
        Ollama, which accepts any Host on another address)."""
        patterns = [o.strip().lower() for o in (*origins, *DEFAULT_ORIGINS) if o.strip()]
        self._any_origin = "*" in patterns
        self._exact = frozenset(p for p in patterns if "*" not in p)
        self._wildcards = tuple(tuple(p.split("*", 1)) for p in patterns if "*" in p and p != "*")
        self._check_host = loopback_only
        self._hostname = (hostname if hostname is not None else socket.gethostname()).lower()
        self._allowed_hosts = frozenset(h.strip().lower().strip("[]") for h in allowed_hosts)
        self._own = own_addresses(self._hostname) if loopback_only else frozenset()
        # Verdicts on the few Host and Origin values a machine's clients send, so a
        # request costs dict lookups, not address parses and pattern walks.
        self._hosts: dict[str, bool] = {}
        self._origins: dict[str, bool] = {}

    def verdict(self, method: str, host: str, origin: str) -> Verdict:
        if origin and origin not in (f"http://{host}", f"https://{host}"):
            if not _remembered(self._origins, origin, self.origin_allowed):
                return Verdict(refusal=f"origin not allowed: {origin} (see cors.origins)")
            allow = "*" if self._any_origin else origin
            if method == "OPTIONS":
                return Verdict(preflight=True, headers=(
                    ("Access-Control-Allow-Origin", allow),
                    ("Access-Control-Allow-Methods", ALLOWED_METHODS),
                    ("Access-Control-Allow-Headers", ALLOWED_HEADERS),
                    ("Access-Control-Max-Age", PREFLIGHT_MAX_AGE),
                    ("Vary", "Origin, Access-Control-Request-Method,"
                             " Access-Control-Request-Headers"),
                ))
            cors = (("Access-Control-Allow-Origin", allow), ("Vary", "Origin"))
        else:
            cors = ()
        if self._check_host and not _remembered(self._hosts, host, self.host_allowed):
            return Verdict(refusal=f"host not allowed: {host} (see server.allowed_hosts)")
        return Verdict(headers=cors) if cors else SERVE

    def origin_allowed(self, origin: str) -> bool:
        if self._any_origin or origin in self._exact:
            return True
        return any(origin.startswith(prefix) and origin.endswith(suffix)
                   and len(origin) >= len(prefix) + len(suffix)
                   for prefix, suffix in self._wildcards)

    def host_allowed(self, host: str) -> bool:
        """Ollama's rule: a local name, or a loopback, private, unspecified or own IP."""
        name = host.lower()
        if name.startswith("["):
            name = name[1:].partition("]")[0]
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        if name in self._allowed_hosts:
            return True
        try:
            address = unmapped(ipaddress.ip_address(name))
        except ValueError:
            return (name in ("", "localhost", self._hostname)
                    or name.endswith(_LOCAL_SUFFIXES))
        return (address.is_loopback or address.is_unspecified
                or any(address in network for network in _PRIVATE)
                or str(address) in self._own)
