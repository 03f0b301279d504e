"""Shared test fixtures: paths to the optional ../shared data and small helpers."""

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
    import os
    import sys
    from collections import Counter
    variant = "kt_kernel not imported"
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
