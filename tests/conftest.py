import faulthandler
import os
import signal
import time

import numpy as np
import pytest
import torch

from data.packed import ShardWriter


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped, and reported as skipped, where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `"gpu" in item.keywords`: that matches a folder named gpu too
            item.add_marker(skip_gpu)


# scripts/gpu_check.sh runs the GPU tests on a lent machine whose minutes are few, without pytest plugins it cannot
# install: each test gets TEST_TIMEOUT_S seconds, and TEST_RESULTS_FILE gets one line per test as it starts and
# ends, so that a run killed from outside still tells which tests passed, failed or hung.
TEST_TIMEOUT_S = float(os.environ.get("TEST_TIMEOUT_S", 0))
TEST_RESULTS_FILE = os.environ.get("TEST_RESULTS_FILE")
HARD_KILL_GRACE_S = 15  # a test stuck in C (a hung kernel) ignores the alarm: then the process dies with a traceback


def record_test(line):
    """Append one line to TEST_RESULTS_FILE at once (flushed and synced: the next moment may be a kill)."""
    if TEST_RESULTS_FILE:
        with open(TEST_RESULTS_FILE, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


class TestTimeout(Exception):
    pass


def _time_out(signum, frame):
    raise TestTimeout(f"test ran past TEST_TIMEOUT_S={TEST_TIMEOUT_S:g} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With TEST_TIMEOUT_S: an alarm fails a test that runs too long (setup, call and teardown together), and
    faulthandler ends the whole run HARD_KILL_GRACE_S later if the alarm could not interrupt it."""
    record_test(f"START {item.nodeid}")
    if TEST_TIMEOUT_S > 0:
        previous = signal.signal(signal.SIGALRM, _time_out)
        signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT_S)
        faulthandler.dump_traceback_later(TEST_TIMEOUT_S + HARD_KILL_GRACE_S, exit=True)
    start = time.monotonic()
    try:
        yield
    finally:
        if TEST_TIMEOUT_S > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            faulthandler.cancel_dump_traceback_later()
        record_test(f"END {item.nodeid} {time.monotonic() - start:.1f}s")


def pytest_runtest_logreport(report):
    """One line per test outcome: a failure or skip in setup, else the call's outcome."""
    if report.when == "call" or report.outcome != "passed":
        outcome = report.outcome.upper()
        if report.failed and "TestTimeout" in str(report.longrepr):
            outcome = "TIMEOUT"
        record_test(f"{outcome} {report.nodeid} ({report.when}, {report.duration:.1f}s)")


@pytest.fixture
def markov_data(tmp_path) -> str:
    """Packed train/val shards of learnable tokens (vocab 64): each follows a fixed successor of the previous
    one 80% of the time, so a tiny model's loss falls from ln 64 = 4.16 towards the entropy, ~1.31."""
    return markov_shards(tmp_path / "markov")


def markov_shards(folder, vocab=64, n=60_000, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    successor = rng.permutation(vocab - 1) + 1
    tokens = np.empty(n, dtype=np.int64)
    tokens[0] = 1
    noise = rng.integers(1, vocab, n)
    follow = rng.random(n) < 0.8
    for i in range(1, n):
        tokens[i] = successor[tokens[i - 1] - 1] if follow[i] else noise[i]
    for split, part in (("train", tokens[: n * 9 // 10]), ("val", tokens[n * 9 // 10:])):
        writer = ShardWriter(folder, split, 1000, sep_token=0, dtype=np.uint16)  # whole chunks: no padding
        writer.add(part)
        writer.close()
    return str(folder)
