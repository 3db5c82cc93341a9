"""`foreman jobs ...`: use a running daemon's job queue from a shell script.

The daemon's address and token come from the same config file it runs with.
Every command prints JSON on stdout; `wait` exits 0 when the job succeeded,
1 when it ended otherwise or the wait ran out, and errors exit 1 with the
daemon's message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import requests

from .config import Config

FINAL = ("succeeded", "failed", "cancelled")


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
    for verb, text in (("show", "print one job"), ("cancel", "cancel a job")):
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


class DaemonClient:
    def __init__(self, config: Config) -> None:
        host = config.listen.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
        self.base = f"http://{host}:{config.listen.port}"
        self.session = requests.Session()
        self.session.trust_env = False
        if config.token:
            self.session.headers["Authorization"] = f"Bearer {config.token}"

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.session.request(method, self.base + path, timeout=90, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text.strip() or f"HTTP {response.status_code}"}
        if response.status_code >= 400:
            raise RuntimeError(body.get("error", body) if isinstance(body, dict) else body)
        return body


def run_jobs(config: Config, args: argparse.Namespace) -> int:
    client = DaemonClient(config)
    try:
        outcome = _dispatch(client, args)
    except (RuntimeError, ValueError) as exc:
        print(f"foreman: {exc}", file=sys.stderr)
        return 1
    except requests.RequestException as exc:
        print(f"foreman: cannot reach the daemon at {client.base}: {type(exc).__name__}",
              file=sys.stderr)
        return 1
    document, code = outcome
    print(json.dumps(document, indent=2))
    return code


def _dispatch(client: DaemonClient, args: argparse.Namespace) -> tuple[Any, int]:
    if args.verb == "submit":
        body: dict[str, Any] = {"kind": args.kind, "request": build_request(args),
                                "priority": args.priority}
        if args.webhook:
            body["webhook"] = args.webhook
        headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
        return client.call("POST", "/jobs", json=body, headers=headers), 0
    if args.verb == "list":
        params = {k: v for k, v in (("status", args.status), ("kind", args.kind),
                                    ("limit", args.limit), ("after", args.after)) if v}
        return client.call("GET", "/jobs", params=params), 0
    if args.verb == "show":
        return client.call("GET", f"/jobs/{args.id}"), 0
    if args.verb == "cancel":
        return client.call("POST", f"/jobs/{args.id}/cancel"), 0
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while True:
        left = 60.0 if deadline is None else max(0.0, min(60.0, deadline - time.monotonic()))
        asked = time.monotonic()
        job = client.call("GET", f"/jobs/{args.id}", params={"wait": f"{left:.3f}"})
        if job["status"] in FINAL or (deadline is not None and time.monotonic() >= deadline):
            return job, 0 if job["status"] == "succeeded" else 1
        if time.monotonic() - asked < 1.0:
            time.sleep(1.0)  # the daemon had no long-poll to spare: do not spin
