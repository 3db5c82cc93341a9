"""Configuration: the YAML file's schema, its parsing and its validation.

The key layout is the public contract.  Every key is declared once, as a
dataclass field whose metadata names the parser for its value, so the schema,
the defaults, the unknown-key check and the redacted dump all come from one
place.  Any problem is a ConfigError naming the file, the key path and what is
wrong.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

SECRET_KEYS = frozenset({"token", "webhook_secret"})


class ConfigError(Exception):
    """A config problem, phrased for the operator: `file: key.path: what is wrong`."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + problem)


class _ValueProblem(ValueError):
    """Raised by a value parser; the loader adds file and key path."""


_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}
_NUMBER_WITH_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: Any) -> float:
    """Seconds from a number of seconds or a string such as `250ms`, `30s`, `5m`, `1h`."""
    if isinstance(value, bool):
        raise _ValueProblem(f"expected a duration such as 30s or 5m, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _NUMBER_WITH_UNIT.match(str(value))
        unit = match.group(2).lower() if match else None
        if unit not in _DURATION_UNITS:
            raise _ValueProblem(
                f"expected a duration such as 250ms, 30s, 5m or 1h, got {value!r}"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[unit]
    if seconds < 0:
        raise _ValueProblem(f"a duration cannot be negative, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest way to write `seconds` in the units parse_duration reads."""
    if seconds == 0:
        return "0s"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds * 1000:g}ms"


def _at_least(minimum: float, why: str) -> Callable[[Any], float]:
    """A duration parser for keys where a tiny value breaks the daemon."""

    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds < minimum:
            raise _ValueProblem(f"must be at least {format_duration(minimum)} ({why}),"
                                f" got {value!r}")
        return seconds

    parse.unit = "duration"  # type: ignore[attr-defined]
    return parse


def parse_size(value: Any) -> int:
    """Bytes from a number of bytes or a string such as `64MB`."""
    if isinstance(value, bool):
        raise _ValueProblem(f"expected a size such as 64MB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _NUMBER_WITH_UNIT.match(str(value))
        unit = match.group(2).lower() if match else None
        if unit not in _SIZE_UNITS:
            raise _ValueProblem(f"expected a size such as 512KB, 64MB or 1GB, got {value!r}")
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise _ValueProblem(f"a size must be positive, got {value!r}")
    return size


# How --check writes a parsed value back: in the units people write.
parse_duration.unit = "duration"  # type: ignore[attr-defined]
parse_size.unit = "size"  # type: ignore[attr-defined]


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _ValueProblem(f"expected a whole number >= 0, got {value!r}")
    return value


def _positive_int(value: Any) -> int:
    if _non_negative_int(value) == 0:
        raise _ValueProblem(f"expected a whole number >= 1, got {value!r}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _ValueProblem(f"expected true or false, got {value!r}")
    return value


def _string(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise _ValueProblem(f"expected a string, got {value!r}")
    return str(value)


def _secret(value: Any) -> str:
    """A token: only a YAML string, since YAML reads `0123` as the number 83 and
    `12.50` as 12.5, and a token changed that way would lock everyone out."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _ValueProblem("a token must be a string: put it in quotes, such as \"0123\"")
    return value


def _string_list(value: Any) -> tuple[str, ...]:
    """A YAML list of strings (or one string, commas separating items, as Ollama's
    OLLAMA_ORIGINS is written)."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise _ValueProblem(f"expected a list of strings, got {value!r}")
    return tuple(item.strip() for item in items if item.strip())


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a webhook secret: a Standard Webhooks secret (`whsec_` and
    base64) decoded as the specification says, any other string as its UTF-8."""
    if not secret.startswith("whsec_"):
        return secret.encode()
    try:
        return base64.b64decode(secret[len("whsec_"):], validate=True)
    except ValueError:
        raise _ValueProblem("a secret starting with whsec_ must continue in base64") from None


def _webhook_secret(value: Any) -> str:
    secret = _secret(value)
    webhook_key(secret)
    return secret


def _one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _string(value).lower()
        if text not in choices:
            raise _ValueProblem(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def _http_url(value: Any) -> str:
    text = _string(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _ValueProblem(f"expected an http(s) URL such as http://127.0.0.1:11434: {value!r}")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise _ValueProblem(f"the URL has an invalid port: {value!r}") from None
    return text


def redact_url(url: str) -> str:
    """The URL without any user:password it carries."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="<redacted>@" + parts.netloc.rpartition("@")[2]).geturl()


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(value: Any) -> ListenAddress:
    text = _string(value).strip()
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _ValueProblem(f"expected host:port such as 127.0.0.1:11435, got {value!r}")
    return ListenAddress(host, int(port))


def _key(parser: Callable[[Any], Any], default: Any) -> Any:
    return field(default=default, metadata={"parse": parser})


def format_size(size: int) -> str:
    """The shortest way to write `size` bytes in the units parse_size reads."""
    for unit, factor in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


# How --check writes a value back, by its parser's unit.
_FORMATS: dict[str, Callable[[Any], str]] = {"duration": format_duration, "size": format_size}


def _section(cls: type) -> Any:
    return field(default_factory=cls)


@dataclass(frozen=True)
class TargetConfig:
    url: str = _key(_http_url, "http://127.0.0.1:11434")
    token: str = _key(_secret, "")
    connect_timeout: float = _key(_at_least(0.001, "every call to the target needs time"), 5.0)
    read_timeout: float = _key(_at_least(0.001, "every call to the target needs time"), 600.0)
    first_token_timeout: float = _key(_at_least(0.001, "a generation needs time to start"),
                                      600.0)
    stall_timeout: float = _key(_at_least(0.001, "a live stream needs time between chunks"),
                                60.0)
    allow_admin: bool = _key(_boolean, False)


@dataclass(frozen=True)
class InventoryConfig:
    poll_interval: float = _key(_at_least(0.1, "faster polling only loads the target"), 10.0)
    repoll_cooldown: float = _key(parse_duration, 1.0)
    poll_timeout: float = _key(_at_least(0.001, "a poll needs time to be answered"), 5.0)


@dataclass(frozen=True)
class EmbedderConfig:
    model: str = _key(_string, "")


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise _ValueProblem(f"expected a number from 0 to 1, such as 0.2, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ChatConfig:
    concurrency: int = _key(_positive_int, 1)
    max_queue: int = _key(_non_negative_int, 64)
    max_wait: float = _key(parse_duration, 0.0)
    affinity_wait: float = _key(parse_duration, 20.0)


@dataclass(frozen=True)
class EmbedConfig:
    concurrency: int = _key(_non_negative_int, 0)
    max_queue: int = _key(_non_negative_int, 64)


@dataclass(frozen=True)
class JobsConfig:
    db: str = _key(_string, "")  # "": default_job_store(), resolved at load
    max_attempts: int = _key(_positive_int, 3)
    retention: float = _key(_at_least(1.0, "a finished job must stay long enough to be"
                                            " collected"), 7 * 86400.0)
    min_share: float = _key(_fraction, 0.2)
    share_after: float = _key(parse_duration, 30.0)
    webhook_secret: str = _key(_webhook_secret, "")
    webhook_hosts: tuple[str, ...] = _key(_string_list, ())
    # With a shared (PostgreSQL) store: this host's name among those sharing it
    # ("": the machine's hostname, resolved at load), and how long a running job's
    # lease lasts without renewal before another host may run it again.
    host_name: str = _key(_string, "")
    lease_timeout: float = _key(_at_least(5.0, "a host renews its leases every third of"
                                               " it, so it must ride out a slow database"),
                                30.0)


@dataclass(frozen=True)
class ServerConfig:
    threads: int = _key(_non_negative_int, 0)
    max_body: int = _key(parse_size, 64 * 1024**2)
    drain_timeout: float = _key(parse_duration, 30.0)
    header_timeout: float = _key(_at_least(0.1, "a client needs time to send its headers"),
                                 10.0)
    max_connections_per_client: int = _key(_non_negative_int, 256)
    allowed_hosts: tuple[str, ...] = _key(_string_list, ())


@dataclass(frozen=True)
class CorsConfig:
    origins: tuple[str, ...] = _key(_string_list, ())


@dataclass(frozen=True)
class MetricsConfig:
    public: bool = _key(_boolean, False)


@dataclass(frozen=True)
class LogConfig:
    level: str = _key(_one_of("debug", "info", "warning", "error"), "info")
    format: str = _key(_one_of("text", "json"), "text")


# Threads beyond the lanes' waiters and holders, so health checks and inventory
# reads are served even when every waiter's thread is parked.
THREAD_HEADROOM = 16


@dataclass(frozen=True)
class Config:
    listen: ListenAddress = _key(parse_listen, ListenAddress("127.0.0.1", 11435))
    token: str = _key(_secret, "")
    target: TargetConfig = _section(TargetConfig)
    inventory: InventoryConfig = _section(InventoryConfig)
    embedder: EmbedderConfig = _section(EmbedderConfig)
    chat: ChatConfig = _section(ChatConfig)
    embed: EmbedConfig = _section(EmbedConfig)
    jobs: JobsConfig = _section(JobsConfig)
    server: ServerConfig = _section(ServerConfig)
    cors: CorsConfig = _section(CorsConfig)
    metrics: MetricsConfig = _section(MetricsConfig)
    log: LogConfig = _section(LogConfig)

    @property
    def threads(self) -> int:
        """The waitress pool size: enough for every waiter and holder, plus headroom."""
        if self.server.threads:
            return self.server.threads
        return (self.chat.max_queue + self.chat.concurrency + self.embed.max_queue
                + self.embed.concurrency + THREAD_HEADROOM)

    def redacted(self) -> dict[str, Any]:
        """The resolved settings as plain data, with every secret replaced."""

        def walk(node: Any) -> Any:
            if not dataclasses.is_dataclass(node) or isinstance(node, ListenAddress):
                return str(node) if isinstance(node, ListenAddress) else node
            out = {}
            for f in dataclasses.fields(node):
                value = walk(getattr(node, f.name))
                unit = getattr(f.metadata.get("parse"), "unit", "")
                if f.name in SECRET_KEYS and value:
                    value = "<redacted>"
                elif f.name == "url" or (f.name == "db" and "://" in value):
                    value = redact_url(value)
                elif unit:
                    value = _FORMATS[unit](value)
                out[f.name] = list(value) if isinstance(value, tuple) else value
            return out

        resolved = walk(self)
        resolved["server"]["threads"] = self.threads
        return resolved


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(source, prefix, f"expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, raw in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        spec = fields.get(key) if isinstance(key, str) else None
        if spec is None:
            known = ", ".join(fields)
            raise ConfigError(source, path, f"unknown key (known keys here: {known})")
        if "parse" in spec.metadata:
            try:
                values[key] = spec.metadata["parse"](raw)
            except _ValueProblem as problem:
                raise ConfigError(source, path, str(problem)) from None
        else:
            values[key] = _build(spec.default_factory, raw, source, path)
    return cls(**values)


def default_job_store(environ: Mapping[str, str], platform: str = sys.platform) -> str:
    """The per-user data folder a daemon keeps its job store in, not wherever it was
    started (a repo checkout, or `/` under launchd)."""
    home = environ.get("HOME") or os.path.expanduser("~")
    if platform == "darwin":
        folder = os.path.join(home, "Library", "Application Support")
    elif platform == "win32":
        folder = environ.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
    else:
        xdg = environ.get("XDG_DATA_HOME", "")
        folder = xdg if os.path.isabs(xdg) else os.path.join(home, ".local", "share")
    return os.path.join(folder, "foreman", "foreman.db")


def parse_config(data: Any, source: str = "<config>",
                 environ: Mapping[str, str] | None = None) -> Config:
    """Validate already-loaded YAML data (a mapping, or None for all defaults)."""
    config: Config = _build(Config, data, source, "")
    if not config.jobs.db:
        db = default_job_store(os.environ if environ is None else environ)
        config = dataclasses.replace(config, jobs=dataclasses.replace(config.jobs, db=db))
    if not config.jobs.host_name:
        config = dataclasses.replace(config, jobs=dataclasses.replace(
            config.jobs, host_name=socket.gethostname()))
    return config


def load_config(
    path: str | None, environ: Mapping[str, str] | None = None
) -> Config:
    """Load and validate the config file (or the defaults when path is None).

    FOREMAN_TOKEN, FOREMAN_TARGET_TOKEN, FOREMAN_JOBS_DB and FOREMAN_WEBHOOK_SECRET in `environ`
    override the secrets when they are set and not empty.
    """
    environ = os.environ if environ is None else environ
    source = path or "<defaults>"
    data: Any = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                data = yaml.safe_load(handle)
        except OSError as exc:
            raise ConfigError(source, "", f"cannot read the file: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise ConfigError(source, "", f"not valid YAML{where}: {problem}") from None
    return with_environment(parse_config(data, source, environ), environ)


def with_environment(config: Config, environ: Mapping[str, str]) -> Config:
    """The config with FOREMAN_TOKEN, FOREMAN_TARGET_TOKEN, FOREMAN_JOBS_DB and
    FOREMAN_WEBHOOK_SECRET applied."""
    # An empty variable counts as unset: `FOREMAN_TOKEN=` left over in a service
    # file must not silently switch off the token the config file sets.
    if environ.get("FOREMAN_TOKEN"):
        config = dataclasses.replace(config, token=environ["FOREMAN_TOKEN"])
    if environ.get("FOREMAN_TARGET_TOKEN"):
        config = dataclasses.replace(
            config,
            target=dataclasses.replace(config.target, token=environ["FOREMAN_TARGET_TOKEN"]),
        )
    if environ.get("FOREMAN_JOBS_DB"):  # a URL may carry the database's password
        config = dataclasses.replace(
            config, jobs=dataclasses.replace(config.jobs, db=environ["FOREMAN_JOBS_DB"]))
    if environ.get("FOREMAN_WEBHOOK_SECRET"):
        try:
            secret = _webhook_secret(environ["FOREMAN_WEBHOOK_SECRET"])
        except _ValueProblem as problem:
            raise ConfigError("FOREMAN_WEBHOOK_SECRET", "", str(problem)) from None
        config = dataclasses.replace(
            config, jobs=dataclasses.replace(config.jobs, webhook_secret=secret))
    return config
