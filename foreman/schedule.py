"""Who goes next in the chat slot: arrival order, bent to spare the GPU model swaps.

On one GPU the costliest thing foreman can do is make Ollama swap models, so
when the slot frees the scheduler prefers waiting work for a model that is
resident, within the line's rules (interactive before jobs, priorities among
jobs): affinity only reorders waiters of the same tier and priority.  It is
bounded: once a waiter has been passed over for `affinity_wait` seconds,
arrival order wins.  When nothing waiting is resident but the model that just
ran is, and its client comes back quickly (its think time, learned per model,
is short), the slot is held idle for a moment for that client rather than
swapping at once: the anticipatory scheduling of Iyer and Druschel (2001).
Jobs waiting behind constant interactive work get a share of turns
(`min_share`) once they have waited `share_after` seconds.

What is resident is learned: the models run last (the slot knows what it just
ran), as many of them as Ollama has been seen keeping together in `/api/ps`.
`next_turn` is the one rule, used by the slot when it grants, by the job
worker when it claims, and by the queue view when it estimates, so the
estimates describe the order the scheduler will actually use.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass

from .inventory import canonical_model_name

INTERACTIVE, BATCH = 0, 1  # the line's tiers: interactive requests always before jobs
# Longest idle hold for a client expected back (a quick client returns in ms; a
# person reading an answer does not, and is not waited for).
ANTICIPATE_AT_MOST = 0.25
_THINK_SMOOTHING = 0.3
_SHARE_WINDOW = 20  # turns over which the jobs' share is counted
# Seconds of memory of the slot time interactive work takes, for the jobs'
# estimates: older turns fade (e^-age/memory), and after this long without
# interactive work jobs are no longer charged for it.
INTERRUPT_MEMORY = 60.0
# Seconds over which what the estimates are shown follows that measure: it steps
# as turns come, and each job's estimate multiplies a step by the jobs ahead of it.
INTERRUPT_SMOOTHING = 5.0


@dataclass(frozen=True)
class Candidate:
    """A waiter as the rule sees it."""

    key: Hashable
    tier: int
    priority: int
    model: str  # canonical name; "" when unknown (it never needs a swap)


@dataclass(frozen=True)
class Choice:
    """The rule's answer: the index of who goes next, and why when it is not the
    first in line (for the access log)."""

    index: int
    reason: str | None = None


def next_turn(waiting: Sequence[Candidate], resident: Collection[str],
              passed: dict[Hashable, float], now: float, affinity_wait: float) -> Choice:
    """Who of `waiting` (in line order) goes next.  `passed` maps a waiter to when it
    was first passed over for affinity; this call adds the ones it passes over."""
    head = waiting[0]
    if affinity_wait <= 0 or not head.model or head.model in resident:
        return Choice(0)
    group = [i for i, c in enumerate(waiting) if (c.tier, c.priority) == (head.tier, head.priority)]
    if overdue([waiting[i] for i in group], passed, now, affinity_wait):
        return Choice(0)
    for index in group[1:]:
        if waiting[index].model in resident:
            for skipped in group:
                if skipped == index:
                    break
                passed.setdefault(waiting[skipped].key, now)
            return Choice(index, f"affinity: {waiting[index].model} is loaded,"
                               f" {head.model} would need a swap")
    return Choice(0)


def overdue(waiting: Sequence[Candidate], passed: dict[Hashable, float], now: float,
            affinity_wait: float) -> bool:
    """Whether someone has been passed over long enough: then arrival order wins."""
    return any(now - passed.get(c.key, now) >= affinity_wait for c in waiting)


class Residency:
    """Which chat models are resident: the ones run last, as many as Ollama keeps."""

    def __init__(self, reported: Callable[[], Collection[str]]) -> None:
        """`reported`: the models Ollama lists as loaded (its `/api/ps`), any names."""
        self._reported = reported
        self._recent: deque[str] = deque()  # canonical names, most recent last
        self._capacity = 1
        self._lock = threading.Lock()

    def ran(self, model: str) -> None:
        if not model:
            return
        name = canonical_model_name(model)
        with self._lock:
            reported = {canonical_model_name(m) for m in self._reported()}
            seen = set(self._recent) | {name}
            self._capacity = max(self._capacity, len(reported & seen))
            if name in self._recent:
                self._recent.remove(name)
            self._recent.append(name)
            while len(self._recent) > self._capacity:
                self._recent.popleft()

    def models(self) -> list[str]:
        """Resident chat models, least recently run first."""
        with self._lock:
            if self._recent:
                return list(self._recent)
        return [canonical_model_name(m) for m in self._reported()]

    @property
    def capacity(self) -> int:
        return self._capacity


@dataclass(frozen=True)
class PerJob:
    """What interactive work costs each job turn, on average: the interactive turns
    that come before it, and the reload of the job's model they cause (inside the
    job's own turn, after it has started)."""

    before: float = 0.0
    reload: float = 0.0


class Interruptions:
    """How much slot time interactive work takes per job turn, for the jobs'
    estimates.  Ratios of counts, so they stay well behaved when interactive work
    takes nearly all of the slot; with no job turn lately, the whole of it.  The
    sums fade with age (no window edge for a turn to fall off), and the values
    read follow the ratios smoothly, from the first evidence of them on; they start
    afresh when interactive work starts after a quiet spell."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the slot writes, the queue view reads
        self._taken = 0.0  # fading sum of seconds interactive turns held the slot
        self._reloads = 0.0  # fading sum of seconds jobs reloaded their model after one
        self._job_turns = 0.0  # fading count of job turns
        self._at = 0.0  # when the sums were last faded
        self._last_taken: float | None = None  # when interactive work last took any
        self._shown: PerJob | None = None  # the smoothed values, as of `_at`

    def interactive(self, now: float, held: float) -> None:
        with self._lock:
            if self._last_taken is None or now - self._last_taken > INTERRUPT_MEMORY:
                # Interactive work starts (again): the job turns run before it said
                # nothing about what it costs them.
                self._taken = self._reloads = self._job_turns = 0.0
                self._shown = None
            self._advance(now)
            self._taken += held
            self._last_taken = now

    def job(self, now: float, reload: float) -> None:
        with self._lock:
            self._advance(now)
            self._reloads += reload
            self._job_turns += 1

    def per_job(self, now: float) -> PerJob:
        with self._lock:
            self._advance(now)
            if self._shown is None and self._last_taken is not None:
                self._shown = self._measured(now)  # the first evidence, as it is
            return self._shown or PerJob()

    def _measured(self, now: float) -> PerJob:
        if self._last_taken is None or now - self._last_taken > INTERRUPT_MEMORY:
            return PerJob()
        turns = max(1.0, self._job_turns)
        return PerJob(self._taken / turns, self._reloads / turns)

    def _advance(self, now: float) -> None:
        """Fade the sums to `now` and move the shown values toward their ratios."""
        elapsed = max(0.0, now - self._at)
        fade = math.exp(-elapsed / INTERRUPT_MEMORY)
        self._taken *= fade
        self._reloads *= fade
        self._job_turns *= fade
        self._at = max(self._at, now)
        if self._shown is not None:
            measured = self._measured(now)
            follow = 1.0 - math.exp(-elapsed / INTERRUPT_SMOOTHING)
            self._shown = PerJob(
                self._shown.before + (measured.before - self._shown.before) * follow,
                self._shown.reload + (measured.reload - self._shown.reload) * follow)


class Scheduler:
    """The chat slot's policy, with the state the rule needs: who has been passed
    over since when, how quickly each model's client comes back, and the recent
    share of turns that went to jobs."""

    def __init__(self, residency: Residency, affinity_wait: float, min_share: float,
                 share_after: float, load_time: Callable[[str], float | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.residency = residency
        self.affinity_wait, self.min_share, self.share_after = (affinity_wait, min_share,
                                                                share_after)
        self._load_time, self._clock = load_time, clock
        self._passed: dict[Hashable, float] = {}
        self._think: dict[str, float] = {}  # model -> EWMA of its client's return time
        self._released: dict[str, float] = {}  # model -> when its last work ended
        self._last_model = ""
        self._held_for: float | None = None  # the release a hold was made for
        self._hold_until = 0.0
        self._turns: deque[bool] = deque(maxlen=_SHARE_WINDOW)  # went to a job?
        self._interruptions = Interruptions()
        self._after_interactive = ""  # the model of the interactive work that just ended

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    # -- what the slot tells it ---------------------------------------------------

    def arrived(self, model: str, interactive: bool) -> None:
        name = canonical_model_name(model) if model else ""
        released = self._released.pop(name, None) if interactive else None
        if released is not None:
            sample = self._clock() - released
            previous = self._think.get(name)
            self._think[name] = sample if previous is None else (
                _THINK_SMOOTHING * sample + (1 - _THINK_SMOOTHING) * previous)

    def granted(self, key: Hashable, model: str, interactive: bool) -> None:
        self._passed.pop(key, None)
        self._turns.append(not interactive)
        if interactive:  # a job worker's model is known only once it has claimed
            self.residency.ran(model)

    def released(self, model: str, interactive: bool, held: float = 0.0) -> None:
        """Work ended (before the slot is granted again) after holding the slot `held`
        seconds: its model is resident now."""
        self.residency.ran(model)  # a job worker may have claimed another model
        name = canonical_model_name(model) if model else ""
        now = self._clock()
        if interactive:
            self._interruptions.interactive(now, held)
        else:
            swapped_back = self._after_interactive and name and name != self._after_interactive
            self._interruptions.job(now, (self._load_time(name) or 0.0) if swapped_back
                                    else 0.0)
        self._after_interactive = name if interactive else ""
        self._last_model = name
        if model and interactive:
            self._released[name] = now

    def interruption_per_job(self) -> PerJob:
        """Seconds of slot time interactive work (and the reloads it caused) takes per
        job turn: what each job ahead will wait on top of its own time."""
        return self._interruptions.per_job(self._clock())

    def preferred(self, head: Candidate, models: Sequence[str]) -> tuple[list[str], str | None]:
        """Which of `models` (queued jobs' models, as written) a job worker should
        claim from instead of `head`, the job first in line: the resident ones, while
        the head may still be passed over; [] for arrival order."""
        resident = self.residency.models()
        names = {model: canonical_model_name(model) for model in models if model}
        affine = [model for model, name in names.items() if name in resident]
        if not affine:
            return [], None
        stand_in = Candidate(("jobs of", head.priority), head.tier, head.priority,
                             names[affine[0]])
        turn = next_turn([head, stand_in], resident, self._passed, self._clock(),
                         self.affinity_wait)
        return (affine, turn.reason) if turn.index else ([], None)

    def forget(self, key: Hashable) -> None:
        """A waiter left the line without a turn."""
        self._passed.pop(key, None)

    # -- the decision -------------------------------------------------------------

    def pick(self, waiting: Sequence[Candidate]) -> tuple[Choice | None, float | None]:
        """(who goes next, or None to hold the slot idle; until when to hold)."""
        now = self._clock()
        head = waiting[0]
        if self.min_share > 0 and head.tier == INTERACTIVE:
            turn = self._share(waiting, now)
            if turn is not None:
                return turn, None
        resident = self.residency.models()
        turn = next_turn(waiting, resident, self._passed, now, self.affinity_wait)
        if (turn.index == 0 and head.model and head.model not in resident
                and self.affinity_wait > 0
                and not overdue(waiting, self._passed, now, self.affinity_wait)):
            until = self._anticipate(head, now)
            if until is not None:
                self._passed.setdefault(head.key, now)
                return None, until
        return turn, None

    def _share(self, waiting: Sequence[Candidate], now: float) -> Choice | None:
        """A job's turn ahead of interactive work, when jobs have had less than their
        share of recent turns and the first one has waited long enough."""
        for index, candidate in enumerate(waiting):
            if candidate.tier != INTERACTIVE:
                waited = now - self._passed.setdefault(candidate.key, now)
                share = sum(self._turns) / len(self._turns) if self._turns else 1.0
                if waited >= self.share_after and share < self.min_share:
                    return Choice(index, f"min_share: jobs had {share:.0%} of recent turns")
                return None
        return None

    def _anticipate(self, head: Candidate, now: float) -> float | None:
        """When to stop holding the slot for the client of the model that just ran, or
        None not to hold: the head needs a swap, that client comes back quickly, and
        it has not been waited for since this release."""
        model = self._last_model
        released = self._released.get(model)
        think = self._think.get(model)
        if not model or released is None or think is None:
            return None
        if self._held_for == released:  # holding already: until the window closes
            return self._hold_until if now < self._hold_until else None
        window = min(2 * think + 0.005, ANTICIPATE_AT_MOST,
                     0.5 * (self._load_time(head.model) or 2 * ANTICIPATE_AT_MOST))
        if think > window or now >= released + window:
            return None
        self._held_for, self._hold_until = released, released + window
        return self._hold_until
