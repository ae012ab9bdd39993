"""What the test run does when a pytest-xdist worker dies mid-test (a native abort in XLA,
say): the test it died in runs once more on the new worker, and the run always ends.

pytest-xdist 3.8's `--dist loadfile` scheduler has two faults on that path:

- it puts every file the dead worker ever ran back on the queue, the finished ones as empty
  units, and a worker handed an empty unit never reports back, so the run can wait forever at
  its end (pytest-dev/pytest-xdist#1378; a CI run of ours sat there until its time limit);
- it hands the new worker a single unit, and a worker holding one test waits for a second
  before it runs the first (pytest-dev/pytest-xdist#1327).

Here (for every scheduler built on LoadScopeScheduling: loadscope, loadfile, loadgroup)
only the unfinished tests go back on the queue, and the new worker is given enough to
start. The test the worker died in is run again once: its first run is reported as a rerun
(the summary names it), and only a second crash fails it. A rerun that never reports (the
workers' restarts used up, `--max-worker-restart`) fails the run.
"""

import pytest

_crashes: dict[str, int] = {}  # test id -> how many workers it took down (controller only)
_reported: set[str] = set()  # crashed tests whose rerun has reported


def _requeue_unfinished(scheduler, node):
    """LoadScopeScheduling.remove_node, keeping only unfinished tests and letting a test that
    crashed once run again (the controller calls it when `node` dies)."""
    workload = scheduler.assigned_work.pop(node)
    unfinished = {scope: unit for scope, unit in workload.items() if not all(unit.values())}
    if not unfinished:
        return None
    pending = (test for unit in unfinished.values() for test, done in unit.items() if not done)
    crashed_in = next(pending)
    _crashes[crashed_in] = _crashes.get(crashed_in, 0) + 1
    if _crashes[crashed_in] > 1:  # it crashed its rerun too: do not run it a third time
        scope = scheduler._split_scope(crashed_in)
        unfinished[scope][crashed_in] = True
        if all(unfinished[scope].values()):
            del unfinished[scope]
    scheduler.workqueue.update(unfinished)
    for other in scheduler.assigned_work:
        scheduler._reschedule(other)
    return crashed_in


def _schedule_started_nodes_twice(schedule):
    def wrapped(scheduler):
        restarted = scheduler.collection is not None
        schedule(scheduler)
        if restarted:  # a replacement worker: one unit of one test would leave it waiting
            for node in scheduler.nodes:
                scheduler._reschedule(node)

    return wrapped


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    from xdist.scheduler.loadscope import LoadScopeScheduling

    if getattr(LoadScopeScheduling, "_jaxllm_patched", False):
        return
    LoadScopeScheduling.remove_node = _requeue_unfinished
    LoadScopeScheduling.schedule = _schedule_started_nodes_twice(LoadScopeScheduling.schedule)
    LoadScopeScheduling._jaxllm_patched = True


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    """A first crash is a rerun, not a failure: the test runs again on the new worker."""
    if _crashes.get(crashitem, 0) == 1:
        report.outcome = "rerun"


def pytest_report_teststatus(report, config):
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN", {"yellow": True})
    return None


def pytest_runtest_logreport(report):
    if report.nodeid in _crashes and report.outcome != "rerun":  # from its rerun
        _reported.add(report.nodeid)


def _never_rerun() -> list[str]:
    return [test for test, count in _crashes.items() if count == 1 and test not in _reported]


def pytest_terminal_summary(terminalreporter):
    for test, count in _crashes.items():
        if count > 1:
            outcome = "failed"
        elif test in _reported:
            outcome = "passed or failed on its rerun"
        else:
            outcome = "never rerun: the run fails"
        terminalreporter.write_line(
            f"a test worker crashed while running {test} ({count}x; {outcome})", yellow=True
        )


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    if _never_rerun() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
