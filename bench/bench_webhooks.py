"""How long one job's webhook waits while other receivers are slow.

Each round starts K "drippers" (receivers that answer one byte every
`--every` seconds, forever), notifies them, waits until each has its
connection, then notifies a fast receiver and measures from that notify to
the fast receiver holding the delivery.  It also measures how long the
dripping attempts took before foreman cut them (the deadline).  The notifier
is foreman's own `WebhookNotifier`, in this process, with its defaults (a 10 s
deadline per attempt, 8 deliveries at once) unless told otherwise.

Run: `python -m bench.bench_webhooks [--slow 0 1 7 8 12] [--every 0.5] [--deadline 10]`.
"""

from __future__ import annotations

import argparse
import json
import time

from foreman.config import ListenAddress
from foreman.store import Job
from foreman.webhook import WebhookNotifier, WebhookPolicy
from tests.receiver import Dripper, Receiver


def job(job_id: str, url: str) -> Job:
    return Job(id=job_id, seq=1, kind="chat", model="m", status="succeeded", priority=0,
               request_json="{}", webhook=url, created_at=0.0, started_at=None,
               finished_at=None, not_before=0.0, attempts=1, result_json=None, error=None)


def round_with(slow: int, every: float, deadline: float) -> dict[str, float | int]:
    notifier = WebhookNotifier(lambda j: json.dumps({"id": j.id}).encode(),
                               WebhookPolicy([], ListenAddress("127.0.0.1", 1)),
                               attempts=1, deadline=deadline)
    notifier.start()
    drippers = [Dripper(every) for _ in range(slow)]
    fast = Receiver()
    try:
        started = time.monotonic()
        for number, dripper in enumerate(drippers):
            notifier.notify(job(f"slow{number}", dripper.url))
        for dripper in drippers[:8]:  # the pool serves eight at once; the rest wait
            dripper.connected.wait(10)
        notified = time.monotonic()
        notifier.notify(job("fast", fast.url))
        fast.wait(1, timeout=deadline * (slow + 2))
        fast_delay = time.monotonic() - notified
        for dripper in drippers:
            dripper.hung_up.wait(deadline * (slow + 2))
        slow_done = time.monotonic() - started
    finally:
        notifier.stop()
        fast.stop()
    return {"slow": slow, "fast_delivery_s": round(fast_delay, 3),
            "all_slow_cut_after_s": round(slow_done, 2) if slow else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slow", type=int, nargs="+", default=[0, 1, 7, 8, 12])
    parser.add_argument("--every", type=float, default=0.5)
    parser.add_argument("--deadline", type=float, default=10.0)
    args = parser.parse_args()
    for slow in args.slow:
        print(json.dumps(round_with(slow, args.every, args.deadline)), flush=True)


if __name__ == "__main__":
    main()
