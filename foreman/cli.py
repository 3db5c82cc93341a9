"""The command line: serve, check a config, or talk to a running daemon's jobs.

`python foreman.py -c config.yaml` serves until SIGTERM or SIGINT, then
drains; a second signal exits at once.  `--check` validates the config and
prints it with secrets redacted.
`jobs ...` talks to a running daemon's job queue (see jobs_cli).
A config problem is one line on stderr and exit status 2, before any port is
bound.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

import yaml

from . import __version__
from .config import Config, ConfigError, load_config
from .daemon import build_daemon
from .jobs_cli import add_jobs_parser, run_jobs
from .logs import configure_logging
from .store import StoreCorrupt, StoreInUse

EXIT_CONFIG = 2
EXIT_SECOND_SIGNAL = 130

log = logging.getLogger("foreman")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="foreman", description="A queueing, caching front for one Ollama server."
    )
    top.add_argument("-c", "--config", help="YAML config file (default: built-in defaults)")
    top.add_argument("--check", action="store_true",
                     help="validate the config, print it with secrets redacted, and exit")
    top.add_argument("--version", action="version", version=f"foreman {__version__}")
    add_jobs_parser(top.add_subparsers(dest="command", metavar="{jobs}"))
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"foreman: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(yaml.safe_dump(config.redacted(), sort_keys=False), end="")
        return 0
    if args.command == "jobs":
        return run_jobs(config, args)
    return serve(config)


def serve(config: Config) -> int:
    configure_logging(config.log.level, config.log.format)
    try:
        daemon = build_daemon(config)
    except (StoreCorrupt, StoreInUse) as exc:
        print(f"foreman: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.listen, exc.strerror or exc)
        return 1
    stop = threading.Event()
    # Counted in one C call: a handler can be interrupted by the next signal's
    # handler between any two of its own lines, so a flag tested then set could
    # let a quick second signal pass for the first.
    signals = itertools.count()

    def request_stop(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if next(signals):
            # A second signal means "now": every accepted job is already on disk.
            log.warning("received %s again: exiting without draining", name)
            os._exit(EXIT_SECOND_SIGNAL)
        stop.set()
        log.info("received %s: draining (send it again to exit at once)", name)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    daemon.start()
    # The main thread only waits, in short steps: Python runs signal handlers on
    # the main thread, and only between its own waits, so the drain runs on a
    # thread of its own and a second signal is heard within half a second.
    while not stop.wait(0.5):
        pass
    draining = threading.Thread(target=daemon.shutdown, name="foreman-drain")
    draining.start()
    while draining.is_alive():
        draining.join(0.5)
    return 0
