"""Shared test fixtures: paths to the optional ../shared data and small helpers; the thread
share and test order of a parallel run (``pytest -n N``, pytest-xdist)."""

import json
import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Under `pytest -n N` each worker gets its share of the cores, and so do the subprocesses its
# tests start (quickstart runs, torchrun worlds read OMP_NUM_THREADS): N workers each running
# torch on every core would oversubscribe the CPU and spin in OpenMP barriers.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _SHARE = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_SHARE)
    torch.set_num_threads(_SHARE)


def pytest_collection_modifyitems(items):
    """Tests marked `heavy(seconds)` run first, longest first: in a parallel run they then start
    at once instead of last, when nothing would be left to run beside them."""
    def seconds(item) -> float:
        mark = item.get_closest_marker("heavy")
        return mark.args[0] if mark else 0.0
    items.sort(key=seconds, reverse=True)   # stable: the rest keep their order


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or a skip when a user's clone does not have it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not present at {path} (only the project's own machines have it)")
    return path


def shared_jsonl(*parts: str) -> Iterator[dict]:
    """The records of a JSONL file under ../shared/data, or a skip."""
    with open(shared_path(*parts), encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def run_kt_worker(case: str, env: dict | None = None) -> dict:
    """Run one case of tests/kt_worker.py in a subprocess (a kt-kernel crash kills that process,
    not the test run) and return the JSON it printed on its ``KT_RESULT`` line."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "kt_worker.py"), case], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"kt worker {case!r} exited with {proc.returncode}:\n{tail}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("KT_RESULT ")]
    assert lines, f"kt worker {case!r} printed no result:\n{tail}"
    return json.loads(lines[-1].removeprefix("KT_RESULT "))


@pytest.fixture(scope="session")
def upstream_tokenizer():
    """MiniMind's own tokenizer from ../shared/data (the expected strings of several tests spell
    out its chat template), or a skip."""
    from model.tokenizer import Tokenizer

    return Tokenizer.from_dir(shared_path("minimind_tokenizer"))


@pytest.fixture
def one_thread_private_cache(tmp_path, monkeypatch):
    """Tiny models run fastest on one thread; the token cache stays inside the test's folder.
    Opt in per file: ``pytestmark = pytest.mark.usefixtures("one_thread_private_cache")``."""
    monkeypatch.setenv("MINIMIND_DATA_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# --- one summary line for the kt-kernel tests, so a CI log says whether they ran and why not ----

_KT_REPORTS: dict[str, tuple[str, str]] = {}  # nodeid -> (outcome, skip reason)


def _is_kt_test(nodeid: str) -> bool:
    path, _, name = nodeid.partition("::")
    tokens = set(name.split("[")[0].split("_"))
    return Path(path).name.startswith("test_kt") or bool(tokens & {"kt", "mxfp4", "variant"})


def pytest_runtest_logreport(report):
    if not _is_kt_test(report.nodeid):
        return
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _KT_REPORTS[report.nodeid] = ("skipped", reason.removeprefix("Skipped: "))
    elif report.failed:
        _KT_REPORTS[report.nodeid] = ("failed", "")
    elif report.when == "call":
        _KT_REPORTS[report.nodeid] = ("passed", "")


def pytest_terminal_summary(terminalreporter):
    if not _KT_REPORTS:
        return
    import sys
    from collections import Counter
    variant = "kt_kernel not imported"
    if "kt_kernel" not in sys.modules and terminalreporter.config.getoption("numprocesses", None):
        import contextlib
        # the tests ran in worker processes: see which variant loads here (any import failure
        # means "not imported", as it did in the workers)
        with contextlib.suppress(Exception):
            import kt_kernel  # noqa: F401
    if "kt_kernel" in sys.modules:
        variant = repr(getattr(sys.modules["kt_kernel"], "__cpu_variant__", None))
    forced = os.environ.get("KT_KERNEL_CPU_VARIANT")
    outcomes = Counter(o for o, _ in _KT_REPORTS.values())
    ran = Counter(Path(n.split("::")[0]).name for n, (o, _) in _KT_REPORTS.items() if o != "skipped")
    why = Counter(r for o, r in _KT_REPORTS.values() if o == "skipped")
    line = (f"kt-kernel tests (CPU variant {variant}{f', forced {forced}' if forced else ''}): "
            f"{outcomes['passed']} passed, {outcomes['failed']} failed"
            f" [{', '.join(f'{f} {c}' for f, c in sorted(ran.items())) or 'none ran'}]; "
            f"{outcomes['skipped']} skipped")
    if why:
        line += ": " + "; ".join(f"{r} (x{c})" for r, c in why.most_common())
    terminalreporter.write_line(line)
