"""Long streams, where whole batches cross the main process still pickled (``StageRunner.packed``) and
workers send their outputs pickled for the next queue (``Emitter.emit_packed``): nothing is lost,
duplicated or reordered, also when workers die holding such a batch."""

from __future__ import annotations

from collections import Counter

import pytest

from runner import run_pipeline

TASKS = '''
import os, signal, time
from pathlib import Path

def killed_twice(x):
    """SIGKILLs its own process the first time it holds item 12000 or 25000 (marks make it once)."""
    if x in (12000, 25000):
        try:
            os.close(os.open(Path(os.environ["MARKS"], str(x)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return x
        os.kill(os.getpid(), signal.SIGKILL)
    return x

def stuck_on_15000(x):
    if x == 15000:
        time.sleep(60)
    return x

def plus_minus(x):
    yield x
    yield -x

def triple(x):
    return [x, x, x]
'''


def chain(kind: str, function: str, stop: int, extra: str = "", queues: str = "") -> str:
    """src -> a -> work -> b -> relay (1 process) -> c -> out (collect): work's outputs go to a queue a
    worker reads, so they travel pickled from worker to queue; relay does the same for its own."""
    return f"""version: 1
{queues}stages:
  - {{name: src, kind: producer, source: {{range: {{stop: {stop}}}}}, output: a}}
  - {{name: work, kind: {kind}, processes: 2, input: a, function: "{function}", output: b{extra}}}
  - {{name: relay, kind: consumer, input: b, function: identity, output: c}}
  - {{name: out, kind: consumer, input: c, function: collect}}
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["consumer", "pool"])
@pytest.mark.parametrize("method", ["fork", "spawn"])  # a forkserver started earlier keeps an old MARKS
def test_workers_killed_holding_whole_batches_lose_nothing(tmp_pipeline, marks, kind, method):
    """30,000 items; two workers SIGKILLed mid-stream: with retry every item arrives exactly once."""
    text = chain(kind, "tasks_t:killed_twice", 30_000, ", on_error: retry, retry_backoff: 0")
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method=method)
    assert result.exit_code == 0, result.error
    assert Counter(result.collected["out"]) == Counter(range(30_000))
    assert result.stats["work"].restarts == 2
    assert result.stats["work"].items_out == result.stats["relay"].items_in == 30_000


@pytest.mark.timeout(120)
def test_timeout_inside_a_whole_batch_skips_only_that_item(tmp_pipeline):
    """A call stuck in the middle of a long stream is timed out; its worker is replaced, the item skipped,
    and every other item of its batch still arrives once."""
    text = chain("pool", "tasks_t:stuck_on_15000", 30_000, ", timeout: 0.5, on_error: skip")
    result = run_pipeline(tmp_pipeline(text, TASKS), start_method="fork")
    assert result.exit_code == 0, result.error
    assert Counter(result.collected["out"]) == Counter(x for x in range(30_000) if x != 15000)
    assert result.stats["work"].skipped == 1 and result.stats["work"].restarts == 1


@pytest.mark.timeout(120)
def test_ordered_pool_keeps_order_over_a_long_stream(tmp_pipeline):
    """An ordered pool over 60,000 items hands them on in input order, whole batches or not."""
    result = run_pipeline(tmp_pipeline(chain("pool", "identity", 60_000, ", ordered: true"), TASKS))
    assert result.exit_code == 0, result.error
    assert result.collected["out"] == list(range(60_000))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("maxsize", [10_000, 50])
def test_outputs_reach_small_and_large_queues_whole(tmp_pipeline, maxsize):
    """A generator's two outputs per item, and list results in order, arrive whole whether a chunk's outputs
    fit one message of the next queue (sent on as the worker pickled them) or not (split in the main process)."""
    queues = f"queues: {{b: {{maxsize: {maxsize}}}}}\n"
    result = run_pipeline(tmp_pipeline(chain("pool", "tasks_t:plus_minus", 20_000, queues=queues), TASKS))
    assert result.exit_code == 0, result.error
    assert Counter(result.collected["out"]) == Counter(x * sign for x in range(20_000) for sign in (1, -1))
    assert result.stats["work"].items_out == result.stats["relay"].items_in == 40_000
    text = chain("pool", "tasks_t:triple", 20_000, ", ordered: true", queues=queues)
    result = run_pipeline(tmp_pipeline(text, TASKS))
    assert result.exit_code == 0, result.error
    assert result.collected["out"] == [[x, x, x] for x in range(20_000)]
