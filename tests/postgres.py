"""A throwaway PostgreSQL cluster for the tests: `initdb` into a temporary folder,
`pg_ctl` on a free loopback port, stopped and removed at the end.

PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres`
user Debian's package creates.  Without PostgreSQL the tests that need it skip,
except in CI (`CI=true`), where `.ci/run` installs it and its absence is a
failure.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


def _binaries() -> str | None:
    """The folder with initdb and pg_ctl: on the PATH, or Debian's versioned one."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(found)
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                     key=lambda path: int(path.split("/")[-2]))
    return folders[-1] if folders else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    port: int
    folder: str
    _names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        user = "postgres" if password is None else f"postgres:{password}"
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} in CI: .ci/run must install Debian's postgresql and"
                    " requirements-postgres.txt")
    pytest.skip(f"{reason} (apt-get install postgresql; pip install -r"
                " requirements-postgres.txt); CI runs these tests")


def start_cluster(durable: bool = False) -> Iterator[Cluster]:
    """A running cluster for the session (a generator, for a fixture); `durable`:
    with fsync, as a real server runs (the benchmarks), not without (the tests)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed")
    binaries = _binaries()
    if binaries is None:
        _unavailable("PostgreSQL is not installed")
    assert binaries is not None
    folder = tempfile.mkdtemp(prefix="foreman-pg-")
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(folder, "data"), _free_port()
    subprocess.run([*as_user, f"{binaries}/initdb", "-D", data, "-A", "trust", "-U",
                    "postgres", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    options = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
               f" -c fsync={'on' if durable else 'off'} -c max_connections=200")
    subprocess.run([*as_user, f"{binaries}/pg_ctl", "-D", data, "-o", options, "-l",
                    os.path.join(folder, "log"), "-w", "-t", "60", "start"],
                   check=True, capture_output=True, timeout=90)
    try:
        yield Cluster(port, folder)
    finally:
        subprocess.run([*as_user, f"{binaries}/pg_ctl", "-D", data, "-m", "immediate",
                        "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
