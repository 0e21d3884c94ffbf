"""Stages for real work, worker side (SPEC 1b): class stages and close(), batch, concurrency, async functions,
named routes; and the same through the inline backend, with self-fed work queues and stacks."""

from __future__ import annotations

import multiprocessing
import pickle
import sys
import threading
import time
import uuid

import pytest

from runner import Route, route, worker
from runner.backends.inline import run_inline
from runner.compiler import compile_pipeline
from runner.loader import load_pipeline
from runner.metrics import metrics
from runner.topology import StagePlan
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(60)


class Log:
    """A stand-in for the worker's logger: keeps the records."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict]] = []
        self._seen: set = set()

    def first(self, key) -> bool:
        new = key not in self._seen
        self._seen.add(key)
        return new

    def count(self, event, error) -> bool:  # every record is kept
        return False

    def __getattr__(self, level):
        return lambda event, **fields: self.records.append((level, event, fields))


def plan(**fields) -> StagePlan:
    """A pool stage reading 'a' and writing 'b', with ``fields`` changed."""
    base = {"name": "s", "kind": "pool", "process_names": ("s",), "inputs": ("a",), "outputs": ("b",),
            "retry_backoff": 0.0}
    return StagePlan(**(base | fields))


def run(fn, stage, items, ids=None, partial=None, tries=None, lock=None):
    """run_items on ``items`` with a fresh progress array; the result, the progress array and the records."""
    progress = [0] * worker.PROGRESS_SLOTS
    log = Log()
    result = worker.run_items(fn, stage, 7, list(items), tries, lock, progress, log, ids, partial)
    return result, progress, log


@pytest.fixture
def tasks(tmp_path):
    """Write a tasks module under a name of its own (this process imports it); return ``(module name, folder)``."""

    def write(text: str) -> tuple[str, str]:
        name = f"tasks_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(text)
        return name, str(tmp_path)

    yield write
    for name in [m for m in sys.modules if m.startswith("tasks_")]:
        del sys.modules[name]


CLASSES = """\
import asyncio


class WordCount:
    made = 0

    def __init__(self, lower=False):
        type(self).made += 1
        self.lower = lower
        self.counts = {}

    def __call__(self, line):
        for word in line.split():
            word = word.lower() if self.lower else word
            self.counts[word] = self.counts.get(word, 0) + 1

    def close(self):
        return sorted(self.counts.items())


class Total:
    def __init__(self):
        self.total = 0

    def __call__(self, n):
        self.total += n
        return n

    def close(self):
        return {"total": self.total}


class Nothing:
    def __call__(self, n):
        return n

    def close(self):
        return None


class Gen:
    def __call__(self, n):
        return n

    def close(self):
        yield from (1, 2)


class AsyncClose:
    async def __call__(self, n):
        return n

    async def close(self):
        await asyncio.sleep(0)
        return [10, 20]


class Words:
    def __call__(self, n):
        return n

    def close(self):
        return "a b"


class Span:
    def __call__(self, n):
        return n

    def close(self):
        return range(2)


class Broken:
    def __call__(self, n):
        return n

    def close(self):
        raise ValueError("no luck")


class Unpicklable:
    def __call__(self, n):
        return n

    def close(self):
        return lambda: None


def double(n):
    return 2 * n
"""


# -- class stages and close() ------------------------------------------------------------------------------


def test_class_stage_is_one_instance_called_per_item_and_closed(tasks):
    """`function: mod:Class`: one instance made with the kwargs, called per item across chunks; close()'s
    return is the close answer's outputs (done=0, no ids)."""
    module, base = tasks(CLASSES)
    stage = plan(function=f"{module}:WordCount", kwargs={"lower": True})
    fn = worker.make_function(stage, base, None)
    cls = sys.modules[module].WordCount
    assert isinstance(fn, cls) and cls.made == 1 and fn.lower is True
    first, _, _ = run(fn, stage, ["a b", "B c"])
    second, _, _ = run(fn, stage, ["c c"])
    assert (first.outputs, first.done, second.done) == ([], 2, 1)
    closed = worker.close_result(fn, stage, 9, Log())
    assert (closed.seq, closed.outputs, closed.done, closed.error) == (9, [("a", 1), ("b", 2), ("c", 3)], 0, None)
    assert cls.made == 1


@pytest.mark.parametrize(("cls", "outputs"), [
    ("Total", [{"total": 6}]), ("Nothing", []), ("Gen", [1, 2]), ("AsyncClose", [10, 20]), ("Words", ["a b"]),
    ("Span", [0, 1]),
])
def test_close_returns_none_one_item_or_many(tasks, cls, outputs):
    """close() may return None, one item (a dict or a str is one), an iterable or generator of items, or be async."""
    module, base = tasks(CLASSES)
    stage = plan(function=f"{module}:{cls}")
    fn = worker.make_function(stage, base, None)
    run(fn, stage, [1, 2, 3])
    assert worker.close_result(fn, stage, 0, Log()).outputs == outputs


def test_function_stage_answers_close_with_nothing(tasks):
    """A function (with or without kwargs) has nothing to close: an empty answer."""
    module, base = tasks(CLASSES)
    for stage in (plan(function=f"{module}:double"), plan(function="identity")):
        result = worker.close_result(worker.make_function(stage, base, None), stage, 3, Log())
        assert (result.outputs, result.done, result.error, result.failed) == ([], 0, None, 0)


@pytest.mark.parametrize(("on_error", "dead_letter"), [("fail", None), ("retry", None)])
def test_close_failure_stops_the_run(tasks, on_error, dead_letter):
    """close() raising under `fail` (or `retry` with nowhere to put it) is an error of the stage: the answer
    carries it, named as close()'s."""
    module, base = tasks(CLASSES)
    stage = plan(function=f"{module}:Broken", on_error=on_error, dead_letter=dead_letter)
    result = worker.close_result(worker.make_function(stage, base, None), stage, 0, Log())
    assert result.error is not None
    assert result.error[0] == "close() failed: ValueError: no luck"
    assert "Traceback" in result.error[1]


@pytest.mark.parametrize(("on_error", "dead_letter"), [("skip", None), ("retry", "dead"), ("skip", "dead")])
def test_close_failure_is_logged_under_skip_and_dead_letter(tasks, on_error, dead_letter):
    """Under skip or a dead-letter queue a failing close() is logged and the run goes on without its outputs."""
    module, base = tasks(CLASSES)
    stage = plan(function=f"{module}:Broken", on_error=on_error, dead_letter=dead_letter)
    log = Log()
    result = worker.close_result(worker.make_function(stage, base, None), stage, 0, log)
    assert (result.error, result.outputs, result.dead, result.failed) == (None, [], [], 1)
    assert [(level, event) for level, event, _ in log.records] == [("error", "close() failed: its outputs are lost")]


def test_close_output_that_cannot_be_pickled_fails_close(tasks):
    """An output of close() that cannot cross to a queue fails close(), named, rather than the runner."""
    module, base = tasks(CLASSES)
    stage = plan(function=f"{module}:Unpicklable")
    result = worker.close_result(worker.make_function(stage, base, None), stage, 0, Log())
    assert result.error is not None and result.error[0].startswith("close() failed: ")
    assert "cannot be pickled" in result.error[0] or "pickle" in result.error[0].lower()


def test_worker_answers_close_then_exits_on_none(tasks):
    """The close protocol in a real worker process: a chunk, then (seq, CLOSE, None, None) answered with a
    ChunkResult of close()'s outputs (done=0), then None ends the process with exit code 0."""
    module, base = tasks(CLASSES)
    ctx = multiprocessing.get_context("fork")
    task_r, task_w = ctx.Pipe(duplex=False)
    result_r, result_w = ctx.Pipe(duplex=False)
    stage = plan(function=f"{module}:WordCount")
    spec = worker.WorkerSpec(stage, "s", base, ctx.Queue(), "warning", multiprocessing.current_process().pid,
                             task_r, result_w, ctx.RawArray("q", worker.PROGRESS_SLOTS))
    process = ctx.Process(target=worker.worker_main, args=(spec,), name="s")
    process.start()
    try:
        task_w.send((0, ["a b", "b"], None, None))
        assert result_r.poll(30)
        first = result_r.recv()
        task_w.send((1, worker.CLOSE, None, None))
        assert result_r.poll(30)
        closed = result_r.recv()
        task_w.send(None)
        process.join(30)
    finally:
        if process.is_alive():
            process.kill()
            process.join()
    assert (first.seq, first.done, first.outputs) == (0, 2, [])
    assert (closed.seq, closed.done, closed.outputs, closed.error) == (1, 0, [("a", 1), ("b", 2)], None)
    assert process.exitcode == 0


# -- batch --------------------------------------------------------------------------------------------------


def test_batch_gets_lists_and_counts_per_item():
    """`batch: 3`: the function gets lists of up to 3 items of the chunk; `done` counts items, and a batch's
    outputs inherit the id of its first item."""
    seen = []

    def fn(items):
        seen.append(list(items))
        return [sum(items), -sum(items)] if items[0] else None

    result, progress, _ = run(fn, plan(batch=3), range(8), ids=range(100, 108))
    assert seen == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert (result.outputs, result.done, progress[0]) == ([12, -12, 13, -13], 8, 8)
    frames = worker._result_frames(plan(batch=3), 0, result, list(range(8)), range(100, 108), Log())
    assert pickle.loads(frames[0]).ids == [103, 103, 106, 106]


def test_batch_skip_counts_every_item_of_the_batch():
    """skip applies to the whole batch: each of its items is skipped; the other batches are delivered."""

    def fn(items):
        if 4 in items:
            raise ValueError("four")
        return items

    result, progress, _ = run(fn, plan(batch=3, on_error="skip"), range(8))
    assert (result.outputs, result.done, result.skipped, result.failed) == ([0, 1, 2, 6, 7], 8, 3, 3)
    assert progress[3:6] == [3, 3, 0]


def test_batch_retry_calls_again_with_the_same_list():
    """retry calls the function again with the same list; failed and retried attempts count per item."""
    calls = []

    def fn(items):
        calls.append(list(items))
        if calls.count(items) < 3:
            raise ValueError("not yet")
        return [len(items)]

    result, _, _ = run(fn, plan(batch=2, on_error="retry", retries=3), ["a", "b", "c"])
    assert calls == [["a", "b"]] * 3 + [["c"]] * 3
    assert (result.outputs, result.done, result.failed, result.retried, result.error) == ([2, 1], 3, 6, 6, None)


def test_batch_dead_letters_one_record_per_item_and_answers_at_once():
    """A batch given up on gives a dead letter per item, with its id; the partial answer carries them
    before the rest of the chunk is called."""
    partials = []

    def fn(items):
        if "x" in items:
            raise KeyError("x")
        return items

    stage = plan(batch=2, on_error="retry", retries=1, dead_letter="dead")
    result, _, _ = run(fn, stage, ["a", "b", "x", "c", "d"], ids=range(10, 15),
                       partial=lambda r: partials.append((r.done, list(r.dead_ids), r.outputs[:], r.dead[:], r.partial)))
    letters = [{"item": "x", "error": "KeyError: 'x'", "stage": "s", "attempts": 2},
               {"item": "c", "error": "KeyError: 'x'", "stage": "s", "attempts": 2}]
    assert partials == [(4, [12, 13], ["a", "b"], letters, True)]
    assert (result.outputs, result.done, result.dead) == (["d"], 1, [])
    assert (result.failed, result.retried) == (0, 0)  # counted in the partial answer


@pytest.mark.parametrize("returned", [42, "ab", {"a": 1}])
def test_batch_returning_no_iterable_is_an_error_of_its_items(returned):
    """A batch function must return an iterable of outputs (not a number, a str or a dict) or None: otherwise
    an error of that batch's items, under the policy, reported at run time."""
    result, _, log = run(lambda items: returned, plan(batch=2, on_error="skip"), [1, 2, 3])
    assert (result.outputs, result.skipped, result.done) == ([], 3, 3)
    assert "must return an iterable of outputs" in log.records[0][2]["error"]
    failed, _, _ = run(lambda items: returned, plan(batch=2), [1, 2, 3])
    assert failed.error is not None and failed.error[0].startswith("TypeError: a stage with batch must return")


# -- concurrency and async functions ------------------------------------------------------------------------


class InFlight:
    """Counts calls in flight and the most seen at once."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self.lock = threading.Lock()

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


def test_concurrency_runs_calls_at_once_in_threads_with_outputs_in_input_order():
    """`concurrency: 8` with a plain function: calls overlap in threads; outputs keep input order and the
    progress array ends past the chunk."""
    flight = InFlight()

    def fn(n):
        with flight:
            time.sleep(0.005 * (n % 3))
        return n * 10

    result, progress, _ = run(fn, plan(concurrency=8), range(40))
    assert result.outputs == [n * 10 for n in range(40)]
    assert result.done == 40 and progress[0] == 40 and progress[1] == 0
    assert flight.most > 1


def test_concurrency_progress_never_passes_an_unsettled_item():
    """With concurrency, progress[0] is the first item not yet settled and progress[6] one past the last started:
    every call sees its own index between them, and the later items settled early are folded once it passes."""
    progress = [0] * worker.PROGRESS_SLOTS
    seen = []
    gate = threading.Event()

    def fn(n):
        seen.append((n, progress[0], progress[6]))
        if n == 0:
            gate.wait(10)  # item 0 is the last to finish
        elif n == 5:
            gate.set()
        return n

    result = worker.run_items(fn, plan(concurrency=4), 0, list(range(6)), None, None, progress, Log())
    assert all(frontier <= n < started for n, frontier, started in seen)
    assert (5, 0, 6) in seen and result.outputs == list(range(6)) and progress[0] == progress[6] == 6


def test_concurrency_error_policy_and_ids_hold_per_item():
    """Per item under concurrency: a failing item is skipped alone, and a call's log records name its own item."""
    names = ("numbers",)

    def fn(n):
        if n == 3:
            raise ValueError("three")
        return worker.current_item_id()

    old = worker._id_names
    worker._id_names = names
    try:
        result, _, log = run(fn, plan(concurrency=5, on_error="skip"), range(6), ids=range(6))
    finally:
        worker._id_names = old
    assert result.outputs == ["numbers:0", "numbers:1", "numbers:2", "numbers:4", "numbers:5"]
    assert (result.skipped, result.done) == (1, 6)
    assert [str(fields["item"]) for _, event, fields in log.records if event == "item given up"] == ["3"]


def test_thread_call_past_its_timeout_is_abandoned_and_counted():
    """A plain call past `timeout` under concurrency is abandoned (its thread runs on) and fails as timed out:
    here skipped, while the other items are delivered and run_items returns before the call ends."""
    release = threading.Event()
    ended = threading.Event()

    def fn(n):
        if n == 1:
            release.wait(30)
            ended.set()
        return n

    try:
        result, _, log = run(fn, plan(concurrency=3, timeout=0.2, on_error="skip"), range(5))
        assert not ended.is_set()  # the call is still running: it was abandoned, not waited for
    finally:
        release.set()
    assert (result.outputs, result.skipped, result.failed) == ([0, 2, 3, 4], 1, 1)
    error = next(fields["error"] for _, event, fields in log.records if event == "item given up")
    assert error.startswith("TimeoutError: call timed out after 0.2s (abandoned")
    assert ended.wait(10)


def test_async_function_runs_concurrently_on_one_loop_with_timeouts():
    """`async def` with concurrency: calls overlap on one event loop; a call past `timeout` is cancelled and
    retried under the policy, then delivered."""
    flight = InFlight()
    attempts: dict[int, int] = {}

    async def fn(n):
        import asyncio

        attempts[n] = attempts.get(n, 0) + 1
        with flight:
            await asyncio.sleep(5 if n == 2 and attempts[n] == 1 else 0.01)
        return n

    result, _, _ = run(fn, plan(concurrency=10, timeout=0.3, on_error="retry", retries=2), range(20))
    assert result.outputs == list(range(20))
    assert (result.failed, result.retried, attempts[2]) == (1, 1, 2)
    assert flight.most > 1


def test_async_class_and_async_generator_are_detected():
    """An instance whose __call__ is async, and an async generator function, are awaited (one emits each
    item it yields), even without concurrency."""

    class Call:
        async def __call__(self, n):
            return n + 1

    async def gen(n):
        for i in range(n):
            yield i

    assert worker.is_async(Call()) and worker.is_async(gen) and not worker.is_async(len)
    assert run(Call(), plan(), [1, 2])[0].outputs == [2, 3]
    assert run(gen, plan(), [2, 3])[0].outputs == [0, 1, 0, 1, 2]


# -- routes -------------------------------------------------------------------------------------------------

ROUTED = {"routes": {"default": "evens", "odd": "odds"}, "outputs": ("evens", "odds")}


def test_routes_resolve_to_queue_indexes():
    """`runner.route(name, item)` sends an item to that route's queue; an item without one to `default`."""

    def fn(n):
        if n == 4:
            return (route("odd", n), n)  # a tuple is one item, routed to default
        return route("odd", n) if n % 2 else n

    def gen(n):
        yield route("odd", n)
        yield n

    result, _, _ = run(fn, plan(**ROUTED), range(5))
    assert result.outputs == [0, 1, 2, 3, (Route("odd", 4), 4)]
    assert result.targets == [0, 1, 0, 1, 0]
    many, _, _ = run(gen, plan(**ROUTED, concurrency=2), [7, 8])
    assert (many.outputs, many.targets) == ([7, 7, 8, 8], [1, 0, 1, 0])


def test_missing_default_route_is_an_error_of_the_item():
    """Without a `default` route an unrouted item is an error of its item under the policy (skipped here);
    an unknown route name too; a routed result is never packed for every queue."""
    stage = plan(routes={"odd": "odds", "even": "evens"}, outputs=("odds", "evens"), on_error="skip")

    def fn(n):
        if n == 3:
            return route("prime", n)
        return route("even", n) if n % 2 == 0 else n

    result, _, log = run(fn, stage, range(5))
    assert (result.outputs, result.targets, result.skipped, result.done) == ([0, 2, 4], [1, 1, 1], 2, 5)
    errors = [fields["error"] for _, event, fields in log.records if event == "item given up"]
    assert errors[0].startswith("RouteError: output 1 has no route and stage 's' has no route 'default'")
    assert errors[1] == "RouteError: no route 'prime' in stage 's' (its routes: odd, even)"
    frames = worker._result_frames(stage, 100, result, list(range(5)), None, Log())
    sent = pickle.loads(frames[0])
    assert len(frames) == 1 and sent.packed is None and sent.targets == [1, 1, 1]


def test_route_marker():
    """runner.route is public and its marker pickles (a stage without routes passes it on as an item)."""
    marker = route("a", {"x": 1})
    assert pickle.loads(pickle.dumps(marker)) == marker and repr(marker) == "route('a', {'x': 1})"


# -- the inline backend -------------------------------------------------------------------------------------

INLINE_TASKS = CLASSES + """
import threading
import time

import runner

_lock = threading.Lock()
_now = 0


def slow(n):
    global _now
    with _lock:
        _now += 1
        seen = _now
    time.sleep(0.02)
    with _lock:
        _now -= 1
    return [n, seen]


_anow = 0


async def aslow(n):
    global _anow
    _anow += 1
    seen = _anow
    await asyncio.sleep(0.02)
    _anow -= 1
    return [n, seen]


_tries = {}


def picky(items):
    key = tuple(items)
    _tries[key] = _tries.get(key, 0) + 1
    if 13 in items:
        raise ValueError("unlucky batch")
    if 20 in items and _tries[key] == 1:
        raise ValueError("first time")
    return [sum(items)]


def parity(n):
    if n % 5 == 0:
        return n
    return runner.route("odd" if n % 2 else "even", n)


def expand(n):
    yield runner.route("done", n)
    for child in (2 * n, 2 * n + 1):
        if child < 16:
            yield runner.route("more", child)
"""

LINEAR = """\
version: 1
stages:
  - {name: numbers, kind: producer, source: SOURCE, output: work}
  - {name: work, kind: pool, processes: 2, input: work, function: "TASKS:FUNCTION", output: results}
  - {name: results, kind: consumer, input: results, function: collect}
"""


def inline(tmp_path, text, tasks_text=INLINE_TASKS, **keys):
    """Run a pipeline file inline, ``keys[name]`` (YAML) added to the flow mapping of stage ``name``."""
    module = f"tasks_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{module}.py").write_text(tasks_text)
    for name, extra in keys.items():
        text = text.replace(f"{{name: {name}, ", f"{{name: {name}, {extra}, ")
    path = tmp_path / "p.yaml"
    path.write_text(text.replace("TASKS", module))
    try:
        return run_inline(compile_pipeline(load_pipeline(path)))
    finally:
        sys.modules.pop(module, None)


def balanced(result) -> dict:
    """The metrics of a run, checked balanced everywhere."""
    report = metrics(result)
    assert all(s["balanced"] for s in report["stages"].values()), report["stages"]
    assert report["queues"] and all(q["balanced"] for q in report["queues"].values()), report["queues"]
    return report


def test_inline_word_count_with_class_and_close(tmp_path):
    """Word count: a class stage counts words in its instance and close() emits the counts at the end of its
    input, before the stage's outputs end; every count balances."""
    text = LINEAR.replace("SOURCE", '{items: ["a b", "b c", "c c", "A"]}').replace("FUNCTION", "WordCount")
    text = text.replace("output: results}", "output: results, kwargs: {lower: true}}")
    result = inline(tmp_path, text)
    assert result.exit_code == 0, result.error
    assert result.collected["results"] == [("a", 2), ("b", 2), ("c", 3)]
    report = balanced(result)
    work = report["stages"]["work"]
    assert (work["items_in"], work["delivered"], work["items_out"]) == (4, 4, 3)


def test_inline_close_failure_stops_the_run(tmp_path):
    """A failing close() under `fail` ends the run with exit 1 and a one-line error naming close()."""
    text = LINEAR.replace("SOURCE", "{items: [1]}").replace("FUNCTION", "Broken")
    result = inline(tmp_path, text)
    assert result.exit_code == 1
    assert result.error == "stage 'work' (process work-1) failed: close() failed: ValueError: no luck"


def test_inline_batch_with_skip_retry_and_dead_letters(tmp_path):
    """batch 5 over 1..25: the batch holding 13 is given up on (a dead letter per item), the one holding 20
    fails once and is retried; counts are per item and balance."""
    text = LINEAR.replace("SOURCE", "{range: {start: 1, stop: 26}}").replace("FUNCTION", "picky") + (
        "  - {name: dead, kind: consumer, input: failed, function: collect}\n")
    text = text.replace("output: results}", "output: results, dead_letter: failed, on_error: retry}")
    result = inline(tmp_path, text, work="batch: 5, retries: 1, retry_backoff: 0")
    assert result.exit_code == 0, result.error
    assert result.collected["results"] == [15, 40, 90, 115]
    assert [letter["item"] for letter in result.collected["dead"]] == [11, 12, 13, 14, 15]
    assert {letter["attempts"] for letter in result.collected["dead"]} == {2}
    work = balanced(result)["stages"]["work"]
    assert (work["items_in"], work["delivered"], work["dead_lettered"], work["skipped"]) == (25, 20, 5, 0)
    assert (work["failed"], work["retried"]) == (15, 10)  # 13's batch: 2 attempts x 5 items; 20's: 1 x 5


def test_inline_batch_skip(tmp_path):
    """Under skip, every item of a failing batch counts skipped."""
    text = LINEAR.replace("SOURCE", "{range: {start: 10, stop: 16}}").replace("FUNCTION", "picky")
    result = inline(tmp_path, text, work="batch: 4, on_error: skip")
    assert result.exit_code == 0, result.error
    assert result.collected["results"] == [29]  # [10, 11, 12, 13] holds 13; [14, 15] does not
    work = balanced(result)["stages"]["work"]
    assert (work["skipped"], work["delivered"]) == (4, 2)


def test_inline_concurrency_overlaps_calls(tmp_path):
    """concurrency 50, 200 calls of 20 ms: calls overlap (most seen in flight > 1) and every output arrives,
    in input order."""
    text = LINEAR.replace("SOURCE", "{range: {start: 0, stop: 200}}").replace("FUNCTION", "slow")
    result = inline(tmp_path, text, work="concurrency: 50")
    assert result.exit_code == 0, result.error
    out = result.collected["results"]
    assert [n for n, _ in out] == list(range(200))
    assert max(seen for _, seen in out) > 1
    balanced(result)


def test_inline_async_function_with_concurrency(tmp_path):
    """An async def stage with concurrency 20 runs its calls on one loop at once; every output arrives."""
    text = LINEAR.replace("SOURCE", "{range: {start: 0, stop: 60}}").replace("FUNCTION", "aslow")
    result = inline(tmp_path, text, work="concurrency: 20")
    assert result.exit_code == 0, result.error
    out = result.collected["results"]
    assert sorted(n for n, _ in out) == list(range(60))
    assert max(seen for _, seen in out) > 1
    balanced(result)


ROUTES = """\
version: 1
stages:
  - {name: numbers, kind: producer, source: {range: {start: 1, stop: 13}}, output: numbers}
  - {name: split, kind: consumer, input: numbers, function: "TASKS:parity", output: {odd: odds, even: evens}}
  - {name: odds, kind: consumer, input: odds, function: collect}
  - {name: evens, kind: consumer, input: evens, function: collect}
"""


def test_inline_routes_to_two_queues_and_missing_default(tmp_path):
    """Named routes send each item to its own queue; without a `default` route an unrouted item (5, 10) is an
    error of that item: skipped here, and every queue balances."""
    result = inline(tmp_path, ROUTES, split="on_error: skip")
    assert result.exit_code == 0, result.error
    assert result.collected == {"odds": [1, 3, 7, 9, 11], "evens": [2, 4, 6, 8, 12]}
    report = balanced(result)
    assert report["stages"]["split"]["skipped"] == 2
    assert report["queues"]["odds"]["produced"] == report["queues"]["evens"]["produced"] == 5
    with_default = inline(tmp_path, ROUTES.replace("even: evens}", "even: evens, default: evens}"))
    assert with_default.collected["evens"] == [2, 4, 5, 6, 8, 10, 12]
    failing = inline(tmp_path, ROUTES)
    assert failing.exit_code == 1
    assert failing.error.startswith("stage 'split' (process split) failed on item 5: RouteError: output 5 has no route")


TREE = """\
version: 1
queues:
  work: {type: QUEUE}
stages:
  - {name: root, kind: producer, source: {items: [1]}, output: work}
  - {name: expand, kind: consumer, input: work, function: "TASKS:expand", output: OUTPUT}
  - {name: results, kind: consumer, input: results, function: collect}
"""


@pytest.mark.parametrize(("queue", "order"), [
    ("fifo", list(range(1, 16))),  # breadth first
    ("lifo", [1, 3, 7, 15, 14, 6, 13, 12, 2, 5, 11, 10, 4, 9, 8]),  # depth first, newest child first
])
def test_inline_self_fed_tree_expansion(tmp_path, queue, order):
    """A stage that feeds its own input (tree expansion through a work queue or stack) ends when the queue is
    empty and nothing is in hand: every node once, in FIFO or LIFO order, with exact counts."""
    result = inline(tmp_path, TREE.replace("QUEUE", queue).replace("OUTPUT", "{more: work, done: results}"))
    assert result.exit_code == 0, result.error
    assert result.collected["results"] == order
    report = balanced(result)
    expand = report["stages"]["expand"]
    assert (expand["items_in"], expand["delivered"], expand["items_out"]) == (15, 15, 29)
    assert report["queues"]["work"]["produced"] == 15 and report["queues"]["results"]["produced"] == 15


def test_inline_self_fed_with_batch_and_list_output(tmp_path):
    """Self-fed with a list output (every output to the work queue and the results) and batches: the stage
    reads what it fed itself until none is left."""
    tasks_text = "def halve(items):\n    return [n // 2 for n in items if n > 1]\n"
    text = TREE.replace("QUEUE", "fifo").replace("TASKS:expand", "TASKS:halve").replace("[1]", "[16, 5]")
    result = inline(tmp_path, text.replace("OUTPUT", "[work, results]"), tasks_text, expand="batch: 2")
    assert result.exit_code == 0, result.error
    assert result.collected["results"] == [8, 2, 4, 1, 2, 1]
    report = balanced(result)
    assert report["stages"]["expand"]["items_in"] == 8


def test_by_target_splits_a_routed_result_per_queue():
    """by_target: a routed result's outputs and ids per queue index, each in its order (for the runners)."""
    assert worker.by_target(["a", "b", "c"], [1, 2, 3], [1, 0, 1], 3) == [(["b"], [2]), (["a", "c"], [1, 3]), ([], [])]
    assert worker.by_target(["a"], None, [0], 1) == [(["a"], None)]


CLI_WORDS = """\
version: 1
stages:
  - {name: lines, kind: producer, source: {items: ["a b", "B c", "c"]}, output: lines}
  - {name: count, kind: consumer, input: lines, function: "tasks_t:WordCount", kwargs: {KWARG: true}, output: counts}
  - {name: out, kind: consumer, input: counts, function: collect}
"""


def test_cli_inline_word_count_with_a_class(tmp_pipeline):
    """Through the real entry point: `validate` takes a class's kwargs as its constructor's (and names a wrong
    one), and `run --inline` prints what close() emitted."""
    path = tmp_pipeline(CLI_WORDS.replace("KWARG", "lower"), CLASSES)
    assert run_cli("validate", str(path)).returncode == 0
    result = run_cli(str(path), "--inline", "--no-summary")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == '[["a", 1], ["b", 2], ["c", 2]]'
    wrong = run_cli("validate", str(tmp_pipeline(CLI_WORDS.replace("KWARG", "lowr"), CLASSES)))
    assert wrong.returncode == 2
    assert "unknown keyword argument 'lowr' for tasks_t:WordCount; did you mean 'lower'?" in wrong.stdout + wrong.stderr


def test_inline_close_output_to_its_own_input_is_read(tmp_path):
    """A self-fed class stage: what close() puts on its own input is read too, and close() is not called again."""
    tasks_text = """\
class Countdown:
    closed = 0

    def __call__(self, n):
        return n - 1 if n > 0 else None

    def close(self):
        type(self).closed += 1
        return 2 if type(self).closed == 1 else 100
"""
    text = TREE.replace("QUEUE", "fifo").replace("TASKS:expand", "TASKS:Countdown").replace("[1]", "[3]")
    result = inline(tmp_path, text.replace("OUTPUT", "[work, results]"), tasks_text)
    assert result.exit_code == 0, result.error
    assert result.collected["results"] == [2, 1, 0, 2, 1, 0]
    expand = balanced(result)["stages"]["expand"]
    assert (expand["items_in"], expand["delivered"], expand["items_out"]) == (7, 7, 6)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_concurrent_calls_hold_the_stage_lock_one_at_a_time(asynchronous):
    """`lock` with concurrency: each call (thread or coroutine) runs holding the lock, so none overlap."""
    flight = InFlight()

    def plain(n):
        with flight:
            time.sleep(0.002)
        return n

    async def coroutine(n):
        import asyncio

        with flight:
            await asyncio.sleep(0.002)
        return n

    result, _, _ = run(coroutine if asynchronous else plain, plan(concurrency=6), range(18), lock=threading.Lock())
    assert result.outputs == list(range(18)) and flight.most == 1


def test_async_call_cancelled_while_waiting_for_the_lock_leaves_it_free():
    """An async call timed out while it waits for the stage lock (taken in a thread) releases the lock once
    that thread gets it: later calls run, and the lock is free at the end."""
    lock = threading.Lock()

    async def fn(n):
        import asyncio

        await asyncio.sleep(0.6 if n == 0 else 0)
        return n

    result, _, _ = run(fn, plan(concurrency=3, timeout=0.3, on_error="skip"), range(6), lock=lock)
    assert result.outputs[-3:] == [3, 4, 5] and result.skipped >= 1  # 0, and 1 and 2 if they waited as long
    assert len(result.outputs) + result.skipped == result.done == 6
    assert lock.acquire(blocking=False)


HANGING = """\
import threading
import time

_now = 0
_lock = threading.Lock()


def work(n):
    global _now
    if n == 3:
        time.sleep(600)  # past any timeout: abandoned, never ends
    with _lock:
        _now += 1
        seen = _now
    time.sleep(0.01)
    with _lock:
        _now -= 1
    return [n, seen]
"""


def test_worker_process_with_an_abandoned_call_ends(tmp_path):
    """In real worker processes (local backend): a concurrent call past its timeout is abandoned and skipped (the
    worker is not replaced), and the worker still exits at the end although that call's thread never ends."""
    from runner.backends.local.driver import Supervisor

    module = f"tasks_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{module}.py").write_text(HANGING)
    path = tmp_path / "p.yaml"
    text = LINEAR.replace("TASKS", module).replace("SOURCE", "{range: {stop: 60}}").replace("FUNCTION", "work")
    text = text.replace("version: 1\n", "version: 1\nsettings: {start_method: spawn}\n").replace(
        "{name: work, ", "{name: work, concurrency: 8, timeout: 0.5, on_error: skip, ")
    path.write_text(text)
    result = Supervisor(compile_pipeline(load_pipeline(path))).run()
    assert result.exit_code == 0, result.error
    out = result.collected["results"]
    assert sorted(n for n, _ in out) == [n for n in range(60) if n != 3]  # overlap depends on the chunks cut
    work = balanced(result)["stages"]["work"]
    assert (work["skipped"], work["failed"], work["restarts"]) == (1, 1, 0)
