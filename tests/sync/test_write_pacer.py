"""WritePacer on a fake clock: a lone change is written at once, a burst is coalesced into evenly spaced writes,
and no window of `write_burst / max_writes_per_second` seconds ever holds more than `write_burst` writes (P5's bound
of 2 writes/s per node under 50 pod changes/s)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import pytest

from node_hook.cluster import SyncSettings, WritePacer

PRODUCTION = SyncSettings()


class FakeTime:
    """A clock and a sleep that runs the events scheduled meanwhile, each at its own time."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.stop_at = float("inf")

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def run_until(self, when: float) -> None:
        while self._events and self._events[0][0] <= when:
            due, _, action = heapq.heappop(self._events)
            self.now = max(self.now, due)
            action()
        self.now = max(self.now, when)

    def sleep(self, seconds: float) -> bool:
        self.run_until(self.now + seconds)
        return self.now >= self.stop_at

    def pending(self) -> bool:
        return bool(self._events)

    def next_event(self) -> float:
        return self._events[0][0]


def production_pacer(time: FakeTime) -> WritePacer:
    return WritePacer(PRODUCTION.max_writes_per_second, PRODUCTION.write_burst, PRODUCTION.burst_gap, time.sleep,
                      clock=lambda: time.now)


def simulate(change_times: list[float]) -> tuple[list[float], list[tuple[float, int]]]:
    """The source's writer loop on a fake clock with the production settings: change k (at change_times[k]) makes
    state k the one to publish. Returns (every change's time, [(write time, the state it wrote)])."""
    time = FakeTime()
    pacer = production_pacer(time)
    desired = [-1]
    written: list[tuple[float, int]] = []
    for index, when in enumerate(change_times):
        def change(index: int = index) -> None:
            pacer.changed()
            desired[0] = index
        time.at(when, change)
    last_written = -1
    while True:
        if desired[0] == last_written:  # wait for a change, as the writer waits on its condition
            if not time.pending():
                break
            time.run_until(time.next_event())
            continue
        assert pacer.wait()
        pacer.spend()
        last_written = desired[0]
        written.append((time.now, last_written))
    return change_times, written


def most_writes_in_any_window(times: list[float], window: float) -> int:
    return max(sum(1 for other in times if start <= other < start + window) for start in times)


def test_the_production_pacing_is_two_writes_in_any_second():
    assert (PRODUCTION.max_writes_per_second, PRODUCTION.write_burst, PRODUCTION.burst_gap) == (2.0, 2, 0.05)


def test_a_lone_change_is_written_at_once_and_so_is_the_next_one_soon_after():
    # a pod ADD, its DEL 150 ms later (P2's DEL used to wait for the 0.5 s spacing), then one more 150 ms later
    _, written = simulate([0.0, 0.15, 0.30])
    assert [(round(at, 3), state) for at, state in written] == [(0.0, 0), (0.15, 1), (1.0, 2)]


def test_lone_changes_a_second_apart_are_all_written_at_once():
    changes = [1.0 * index for index in range(10)]
    _, written = simulate(changes)
    assert [at for at, _ in written] == changes


def test_a_burst_is_coalesced_into_writes_spaced_half_a_second_and_the_last_state_is_written():
    changes = [0.02 * index for index in range(300)]  # 50 changes/s for 6 s
    _, written = simulate(changes)
    times = [at for at, _ in written]
    assert times[0] == changes[0], "the first change of a burst goes at once"
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= 0.5 - 1e-9 for gap in gaps), gaps
    assert written[-1][1] == len(changes) - 1, "the latest state is always written in the end"
    assert written[-1][0] - changes[-1] <= 0.5 + 1e-9
    for at, state in written:  # what a write carries is never older than the spacing
        assert at - changes[state] <= 0.5 + 1e-9


def test_p5_bound_two_writes_per_second_under_50_changes_per_second():
    """P5's measure: writes made during 6 s of 50 changes/s, over the elapsed time; and the stricter form of the
    bound, at most 2 writes in any 1 s, holds for mixtures of lone changes and bursts."""
    changes = [0.02 * index for index in range(300)]
    elapsed = 300 * 0.02  # P5 ends the churn one tick after its last change
    _, written = simulate(changes)
    during = [at for at, _ in written if at < elapsed]  # a rate over [start, end): 2 writes per second
    assert len(during) / elapsed <= 2.0, len(during)
    mixed = sorted({*(0.3 * index for index in range(20)),  # lone changes, 300 ms apart
                    *(10.0 + 0.01 * index for index in range(200)),  # a burst at 100/s
                    *(13.0 + 0.06 * index for index in range(30))})  # changes just further apart than burst_gap
    _, written = simulate(mixed)
    times = [at for at, _ in written]
    assert most_writes_in_any_window(times, 1.0 - 1e-9) <= 2, times
    assert written[-1][1] == len(mixed) - 1


def test_the_window_and_the_spacing_follow_the_settings():
    time = FakeTime()
    pacer = WritePacer(10.0, 3, 0.05, time.sleep, clock=lambda: time.now)
    for _ in range(3):
        pacer.changed()
        assert pacer.delay() == 0.0
        pacer.spend()
        time.sleep(0.06)
    pacer.changed()
    assert pacer.delay() == pytest.approx(0.3 - 0.18)  # the third write back plus 3 / 10 s
    time.sleep(0.2)
    pacer.changed()
    time.sleep(0.01)
    pacer.changed()  # 10 ms after the one before: a burst, spaced 1 / 10 s after the last write
    assert pacer.delay() == 0.0  # the last write was 0.33 s ago
    pacer.spend()
    pacer.changed()
    assert pacer.delay() == pytest.approx(0.1)


def test_waiting_ends_when_the_writer_stops():
    time = FakeTime()
    pacer = production_pacer(time)
    for _ in range(2):
        pacer.changed()
        pacer.spend()
    time.stop_at = time.now + 0.2
    assert pacer.wait() is False


@pytest.mark.parametrize("arguments", [(0.0, 2, 0.05), (2.0, 0, 0.05), (2.0, 2, -1.0)])
def test_bad_settings_are_refused(arguments):
    with pytest.raises(ValueError):
        WritePacer(*arguments, sleep=lambda seconds: False)
