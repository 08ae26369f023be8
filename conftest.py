"""The suite's two speeds (docs/TESTING.md).

`python -m pytest -q test_hapo.py` runs tiers 1 and 2 and one short train.py run: the check after
every edit, under two minutes on two cores. `--all` adds tier 3, every test marked `slow` or
`distributed` (train.py runs that stop, fail and resume, two ranks, the scripts' smoke runs): what CI
runs. Tier 3 is deselected, not skipped, so a skip still means "cannot run here" (no vLLM, no CUDA).
"""

import pytest

SLOW = pytest.StashKey[int]()  # how many tests --all would add


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", default=False,
                     help="also run tier 3: the tests marked slow or distributed (what CI runs)")


@pytest.hookimpl(trylast=True)  # after -k and -m: count only the slow tests they would have kept
def pytest_collection_modifyitems(config, items):
    if config.getoption("--all"):
        return
    tier3 = lambda item: item.get_closest_marker("slow") or item.get_closest_marker("distributed")
    slow = [item for item in items if tier3(item)]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not tier3(item)]
        config.stash[SLOW] = len(slow)


def pytest_terminal_summary(terminalreporter, config):
    if config.stash.get(SLOW, 0):
        terminalreporter.write_line(f"tier 3: {config.stash[SLOW]} slow tests not run; add --all to run them")
