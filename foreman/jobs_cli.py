"""`foreman jobs ...`: use a running daemon's job queue from a shell script.

The daemon's address and token come from the same config file it runs with;
the verbs are foreman.Client's.  Every command prints JSON on stdout; `wait`
exits 0 when the job succeeded, 1 when it ended otherwise or the wait ran
out, and errors exit 1 with the daemon's message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .client import Client, ForemanError
from .config import Config


def add_jobs_parser(subparsers: Any) -> None:
    jobs = subparsers.add_parser("jobs", help="submit and follow async jobs on a running daemon")
    verbs = jobs.add_subparsers(dest="verb", required=True)
    submit = verbs.add_parser("submit", help="queue a job and print it")
    submit.add_argument("--kind", choices=("chat", "generate", "embed"), required=True)
    submit.add_argument("--model", help="the model (merged into the request)")
    submit.add_argument("--prompt", help="chat: one user message; generate: the prompt;"
                                         " embed: the input")
    submit.add_argument("--request", help="the Ollama request body as JSON ('-' = stdin)")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--webhook")
    submit.add_argument("--idempotency-key")
    listing = verbs.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--status")
    listing.add_argument("--kind")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--after", help="the cursor from a previous page")
    for verb, text in (("show", "print one job"), ("cancel", "cancel a job"),
                       ("delete", "delete a finished job")):
        verbs.add_parser(verb, help=text).add_argument("id")
    wait = verbs.add_parser("wait", help="wait for a job to end and print it")
    wait.add_argument("id")
    wait.add_argument("--timeout", type=float, default=0, help="seconds; 0 = forever")


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    if args.request is not None:
        text = sys.stdin.read() if args.request == "-" else args.request
        request = json.loads(text)
        if not isinstance(request, dict):
            raise ValueError("--request must be a JSON object")
    else:
        request = {}
    if args.model:
        request["model"] = args.model
    if args.prompt is not None:
        if args.kind == "chat":
            request.setdefault("messages", []).append({"role": "user", "content": args.prompt})
        elif args.kind == "generate":
            request["prompt"] = args.prompt
        else:
            request["input"] = args.prompt
    return request


def daemon_url(config: Config) -> str:
    """Where the daemon that runs with this config answers."""
    host = config.listen.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
    return f"http://{host}:{config.listen.port}"


def run_jobs(config: Config, args: argparse.Namespace) -> int:
    if config.listen.port == 0:
        print("foreman: the config listens on port 0 (a port chosen at start), so there is"
              " no daemon address to use; give the port the daemon printed", file=sys.stderr)
        return 1
    client = Client(daemon_url(config), config.token)
    try:
        document, code = _dispatch(client, args)
    except (ForemanError, ValueError) as exc:
        message = exc.message if isinstance(exc, ForemanError) else str(exc)
        print(f"foreman: {message}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(document, indent=2))
    return code


def _dispatch(client: Client, args: argparse.Namespace) -> tuple[Any, int]:
    if args.verb == "submit":
        return client.submit(args.kind, build_request(args), priority=args.priority,
                             webhook=args.webhook, idempotency_key=args.idempotency_key), 0
    if args.verb == "list":
        return client.page(args.status, args.kind, args.limit, args.after), 0
    if args.verb == "show":
        return client.get(args.id), 0
    if args.verb == "cancel":
        return client.cancel(args.id), 0
    if args.verb == "delete":
        return client.delete(args.id), 0
    job = client.wait(args.id, args.timeout or None)
    return job, 0 if job["status"] == "succeeded" else 1
