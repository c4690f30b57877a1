"""The scheduler's rules on their own: no threads, no models, no clock (``now`` is given), calls as plain records."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import attrs

from loom_kernel.scheduler import STEP, BatchLimits, Scheduler, passes


@attrs.define(eq=False)
class FakeCall:
    name: str
    rows: int = 1
    joins: bool = False
    group: str = "a"
    tokens: int = 10
    cancelled: bool = False
    done: bool = False
    owner: str = ""

    @property
    def batch(self) -> Any:
        return SimpleNamespace(generation=object() if self.joins else None)

    def key(self) -> tuple[Any, ...]:
        return (self.group, self.joins)

    def width(self, limits: BatchLimits) -> int:
        return self.tokens


def test_passes_and_steps_take_turns_and_generations_do_not_queue_behind_passes():
    s = Scheduler()
    for name in ("p1", "p2"):
        s.add(FakeCall(name), now=0.0)
    s.add(FakeCall("g1", joins=True), now=0.0)
    assert s.next(generating=False) is STEP  # the generation waits to join, not behind the passes
    assert [c.name for c in s.waiting] == ["g1"] and s.next(generating=True).name == "p1"
    assert s.next(generating=True) is STEP and s.next(generating=True).name == "p2"
    assert s.next(generating=True) is STEP and s.next(generating=True) is STEP  # nothing queued: steps only
    assert s.next(generating=False) is STEP  # g1 still waits to join
    joining, _ = s.admit(lambda call: (call.group, 0, True))
    assert [[c.name for c in group] for group in joining] == [["g1"]]
    assert s.next(generating=False) is None  # nothing to do


def test_what_came_after_a_load_runs_after_it():
    s = Scheduler()
    load = ("load", None)
    s.add(load, now=0.0)
    s.add(FakeCall("g1", joins=True), now=0.0)
    assert s.next(generating=False) is load and not s.waiting
    assert s.next(generating=False) is STEP and [c.name for c in s.waiting] == ["g1"]


def test_generations_join_in_arrival_order_up_to_the_batch_size_and_the_cancelled_leave():
    s = Scheduler(BatchLimits(max_batch_size=4))
    calls = [
        FakeCall("a", rows=2, joins=True),
        FakeCall("gone", joins=True, cancelled=True),
        FakeCall("b", rows=1, joins=True, group="other"),
        FakeCall("c", rows=2, joins=True),
        FakeCall("d", rows=1, joins=True),
    ]
    for call in calls:
        s.add(call, now=0.0)
    s.next(generating=False)
    running = {"a": 1, "other": 0}
    joining, cancelled = s.admit(lambda call: (call.group, running[call.group], True))
    assert [c.name for c in cancelled] == ["gone"]
    assert [[c.name for c in group] for group in joining] == [["a"], ["b"]]  # c would pass 4 rows: c and d wait
    assert [c.name for c in s.waiting] == ["c", "d"]
    joining, _ = s.admit(lambda call: (call.group, 0, False))  # a cache rows may not join now
    assert joining == [] and [c.name for c in s.waiting] == ["c", "d"]
    joining, _ = s.admit(lambda call: (call.group, 0, True))
    assert [[c.name for c in group] for group in joining] == [["c", "d"]]


def test_owners_take_turns_at_passes_and_at_joining_a_full_batch():
    """One owner's queue of many delays another's request by one, not by all of them; with one owner, arrival
    order; a load still runs where it came."""
    s = Scheduler()
    for name in ("a1", "a2", "a3", "a4"):
        s.add(FakeCall(name, owner="a", group=name), now=0.0)
    s.add(FakeCall("b1", owner="b", group="b1"), now=0.0)
    s.add(("load", None), now=0.0)
    s.add(FakeCall("b2", owner="b"), now=0.0)
    order = [s.next(generating=False) for _ in range(7)]
    names = [item.name if hasattr(item, "name") else item[0] for item in order]
    assert names == ["a1", "b1", "a2", "a3", "a4", "load", "b2"]

    # Generations waiting for a full batch: b's first joins before a's later ones, whatever came first.
    s = Scheduler(BatchLimits(max_batch_size=4))
    for name in ("a1", "a2", "a3", "a4", "a5", "a6"):
        s.add(FakeCall(name, joins=True, owner="a"), now=0.0)
    s.add(FakeCall("b1", joins=True, owner="b"), now=0.0)
    s.next(generating=False)
    joining, _ = s.admit(lambda call: ("one", 0, True))
    assert [c.name for c in joining[0]] == ["a1", "b1", "a2", "a3"]  # each owner's first, then a's
    for call in joining[0][:2]:
        call.done = True  # a1 and b1 finish: two places free, a's calls still running count against it
    s.add(FakeCall("b2", joins=True, owner="b"), now=0.0)
    s.next(generating=True)
    joining, _ = s.admit(lambda call: ("one", 2, True))
    assert [c.name for c in joining[0]] == ["b2", "a4"]

    s = Scheduler()  # one owner: arrival order, as before owners
    for name in ("x1", "x2", "x3"):
        s.add(FakeCall(name, group=name), now=0.0)
    assert [s.next(generating=False).name for _ in range(3)] == ["x1", "x2", "x3"]


def test_another_owners_call_runs_between_two_passes_of_one_call_in_its_turn():
    """Between two passes of a's call (a1, just taken), the queued call of another owner served longest ago is
    taken, never a's own, a generation's (it joins at a step boundary) or one queued after a load; the queue then
    goes on in the owners' turns as before."""
    s = Scheduler()
    for call in (
        FakeCall("a1", owner="a", group="a1"),
        FakeCall("a2", owner="a", group="a2"),
        FakeCall("b1", owner="b", group="b1"),
        FakeCall("c1", owner="c", group="c1"),
    ):
        s.add(call, now=0.0)
    assert s.next(generating=False).name == "a1"
    s.add(FakeCall("g", owner="d", joins=True), now=0.0)  # a generation, queued while a1 runs
    assert s.interject({"a"}).name == "b1"  # b and c never served: the first of them queued
    assert s.interject({"a"}).name == "c1"
    assert s.interject({"a"}) is None  # a's own and d's generation wait
    assert s.next(generating=False) == STEP  # d's generation joins at a step boundary
    assert s.next(generating=False).name == "a2"

    s = Scheduler()  # a task ahead of the other owner's call: it runs where it came
    s.add(FakeCall("a1", owner="a"), now=0.0)
    s.add(("load", None), now=0.0)
    s.add(FakeCall("b1", owner="b"), now=0.0)
    s.next(generating=False)
    assert s.interject({"a"}) is None

    s = Scheduler()  # one owner: nothing runs between its passes
    s.add(FakeCall("x1", group="x1"), now=0.0)
    s.add(FakeCall("x2", group="x2"), now=0.0)
    s.next(generating=False)
    assert s.interject({""}) is None


def test_a_pass_merges_the_compatible_calls_that_fit():
    s = Scheduler(BatchLimits(max_batch_size=4, max_batch_tokens=100))
    first = FakeCall("first", rows=2)
    for call in (FakeCall("other", group="b"), FakeCall("fits"), FakeCall("wide", tokens=40), FakeCall("late")):
        s.add(call, now=0.0)
    g = s.gathering(first, now=0.0, seconds_per_pass=1.0, generating=False)
    s.gather(g)
    # "wide" would make 4 rows x 40 tokens > 100: the batch is full, and "late" (behind it) waits its turn too
    assert [c.name for c in g.group] == ["first", "fits"] and g.full and g.ready(0.0, s.limits)
    assert [c.name for c in s.items] == ["other", "wide", "late"]


def test_rows_that_do_not_fit_one_pass_run_as_passes_of_like_widths_within_the_limits():
    limits = BatchLimits(max_batch_size=2, max_batch_tokens=60)
    assert passes([20, 5, 10], limits) == [[0, 1, 2]]  # 3 rows x 20 tokens fit: one pass, as they came
    widths = [10, 30, 5, 25, 10, 70, 5, 12, 5]
    got = passes(widths, limits)
    assert sorted(i for part in got for i in part) == list(range(len(widths)))  # every row once
    for part in got:
        assert part == sorted(part)
        assert len(part) == 1 or len(part) * max(widths[i] for i in part) <= 60
    # Longest first: the 70-token row alone (wider than the budget), then 30 and 25, then the rest by width
    # (max_batch_size bounds what is merged, not one request's rows: five rows pass it).
    assert got == [[5], [1, 3], [0, 2, 4, 6, 7], [8]]
    assert passes([], limits) == [[]]


def test_a_pass_waits_up_to_one_pass_for_the_company_it_had_lately_and_a_lone_call_never_waits():
    s = Scheduler()
    for i in range(3):
        s.add(FakeCall(f"c{i}"), now=10.0)  # three at once: the key's recent peak
    first = s.items.popleft()
    g = s.gathering(first, now=10.1, seconds_per_pass=0.5, generating=False)
    s.gather(g)
    assert len(g.group) == 3 and g.ready(10.1, s.limits)
    s.ran()
    s.add(FakeCall("again"), now=10.2)
    g = s.gathering(s.items.popleft(), now=10.2, seconds_per_pass=0.5, generating=False)
    s.gather(g)
    assert not g.ready(10.3, s.limits) and g.ready(10.7, s.limits)  # waits for company, at most one pass
    s.add(FakeCall("company"), now=10.4)
    s.gather(g)
    s.add(FakeCall("more"), now=10.4)
    s.gather(g)
    assert len(g.group) == 3 and g.ready(10.4, s.limits)
    s.ran()
    s.add(FakeCall("lone"), now=20.0)  # the peak is in the past: a lone call runs at once
    g = s.gathering(s.items.popleft(), now=20.0, seconds_per_pass=0.5, generating=False)
    assert g.ready(20.0, s.limits)
    s.add(FakeCall("while generating"), now=10.5)
    g = s.gathering(s.items.popleft(), now=10.5, seconds_per_pass=0.5, generating=True)
    assert g.ready(10.5, s.limits)  # nothing waits while rows generate


def test_one_group_joins_a_running_batch_a_boundary():
    """Generations of two keys that land in the same running batch (one decoder) join one boundary apart: each
    group's room is read from the batch as it stands, and a prefill may change it (a sliding-window cache stops
    taking rows), so a second group never joins on the first's stale count."""
    s = Scheduler(BatchLimits(max_batch_size=2))
    for name, group in (("a", "x"), ("b", "y"), ("c", "x")):
        s.add(FakeCall(name, joins=True, group=group), now=0.0)
    s.next(generating=False)
    running = {"one": 0}
    joining, _ = s.admit(lambda call: ("one", running["one"], True))
    assert [[c.name for c in group] for group in joining] == [["a", "c"]]
    assert [c.name for c in s.waiting] == ["b"]
    running["one"] = 1  # "a" left, "c" runs: room for "b" at the next boundary
    joining, _ = s.admit(lambda call: ("one", running["one"], True))
    assert [[c.name for c in group] for group in joining] == [["b"]] and not s.waiting


def test_a_pass_gathers_nothing_queued_behind_a_load():
    s = Scheduler()
    first, load, behind = FakeCall("first"), ("load", None), FakeCall("behind")
    for item in (load, behind):
        s.add(item, now=0.0)
    g = s.gathering(first, now=0.0, seconds_per_pass=0.0, generating=False)
    s.gather(g)
    assert [c.name for c in g.group] == ["first"] and list(s.items) == [load, behind]


def test_the_company_a_key_kept_is_forgotten_once_it_no_longer_counts():
    """Keys come and go (a seed or an attribution metric is part of one): their peaks do not pile up."""
    s = Scheduler()
    for i in range(1000):
        s.add(FakeCall(f"c{i}", group=f"k{i}"), now=float(i))
        s.items.clear()
    assert len(s._peaks) <= 2
