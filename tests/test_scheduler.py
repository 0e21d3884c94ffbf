"""The run's schedule alone (runner.backends.scheduler): start order, ends of queues, the stop; no processes."""

from __future__ import annotations

from runner.backends.scheduler import Lifecycle, Schedule
from runner.topology import QueuePlan, StagePlan, Topology


def _topo(stages: list[StagePlan]) -> Topology:
    names = {q for s in stages for q in (*s.inputs, *s.outputs, *([s.dead_letter] if s.dead_letter else []))}
    queues = {
        q: QueuePlan(q, "fifo", 0, 64, tuple(s.name for s in stages if q in s.outputs or q == s.dead_letter),
                     sum(1 for s in stages if q in s.inputs))
        for q in sorted(names)
    }
    return Topology("t", ".", "fork", "info", "console", None, queues, tuple(stages))


def _stage(name: str, kind: str = "consumer", inputs: tuple[str, ...] = (), outputs: tuple[str, ...] = (),
           **kw: object) -> StagePlan:
    return StagePlan(name, kind, (name,), inputs=inputs, outputs=outputs, **kw)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_after_holds_a_stage_until_the_named_stage_is_done() -> None:
    topo = _topo([_stage("src", "producer", outputs=("q",)), _stage("sink", inputs=("q",)),
                  _stage("report", "producer", after=("sink",))])
    s = Schedule(topo)
    assert [x.name for x in s.startable()] == ["src", "sink"]
    for x in s.startable():
        s.start(x.name)
    assert s.startable() == []
    s.finish("src")
    s.finish("sink")
    assert [x.name for x in s.startable()] == ["report"]


def test_a_queue_ends_once_when_its_last_writer_is_done() -> None:
    topo = _topo([_stage("a", "producer", outputs=("q",)), _stage("b", "producer", outputs=("q",)),
                  _stage("sink", inputs=("q",))])
    s = Schedule(topo)
    for x in s.startable():
        s.start(x.name)
    s.finish("a")
    assert s.queues_to_end() == []
    s.finish("b")
    assert s.queues_to_end() == ["q"]
    assert s.queues_to_end() == []  # never twice


def test_a_dead_letter_queue_waits_for_the_stage_that_writes_its_letters() -> None:
    topo = _topo([_stage("src", "producer", outputs=("q",)), _stage("work", inputs=("q",), dead_letter="dlq"),
                  _stage("dead", inputs=("dlq",))])
    s = Schedule(topo)
    for x in s.startable():
        s.start(x.name)
    s.finish("src")
    assert s.queues_to_end() == ["q"]
    s.finish("work")
    assert s.queues_to_end() == ["dlq"]


def test_a_self_fed_queue_ends_when_other_writers_are_done_and_its_stage_is_idle() -> None:
    topo = _topo([_stage("seed", "producer", outputs=("work",)),
                  _stage("expand", inputs=("work",), outputs=("work", "out")), _stage("sink", inputs=("out",))])
    assert topo.stage("expand").self_fed
    s = Schedule(topo)
    for x in s.startable():
        s.start(x.name)
    idle = {"expand": True}
    assert s.queues_to_end(idle.get) == []  # the seed still writes
    s.finish("seed")
    idle["expand"] = False
    assert s.queues_to_end(idle.get) == []  # items of its own in flight
    idle["expand"] = True
    assert s.queues_to_end(idle.get) == ["work"]
    assert s.queues_to_end(idle.get) == []
    s.finish("expand")
    assert s.queues_to_end(idle.get) == ["out"]


def test_a_stop_finishes_waiting_stages_and_marks_running_ones_stopping() -> None:
    clock = Clock()
    topo = _topo([_stage("src", "producer", outputs=("q",)), _stage("sink", inputs=("q",)),
                  _stage("later", "producer", after=("sink",))])
    s = Schedule(topo, clock)
    for x in s.startable():
        s.start(x.name)
    assert s.time_left() is None
    s.begin_stop(10.0)
    assert s.state == {"src": Lifecycle.STOPPING, "sink": Lifecycle.STOPPING, "later": Lifecycle.DONE}
    assert s.startable() == []
    clock.now += 4
    assert s.time_left() == 6.0
    clock.now += 7
    assert s.time_left() == 0.0
    assert not s.all_done()
    s.finish("src")
    s.finish("sink")
    assert s.all_done()


def test_daemon_stages_do_not_hold_the_end_and_seconds_are_wall_time() -> None:
    clock = Clock()
    topo = _topo([_stage("src", "producer", outputs=("q",)), _stage("watch", "producer", daemon=True)])
    s = Schedule(topo, clock)
    for x in s.startable():
        s.start(x.name)
    clock.now += 2.5
    s.finish("src")
    assert s.all_done()
    assert s.seconds == {"src": 2.5}
    assert s.unfinished() == ["watch"]
