"""The benchmark harness measures what it claims: peak RSS of the measured process, interleaved runs,
ratios ours/anchor, and a results table that renders every benchmark recorded."""

import json
import sys

import pytest

from bench import harness, report


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(harness, "WORK", tmp_path / "work")
    return tmp_path / "results"


def _alloc(mb: int) -> harness.Cmd:
    # Touch every page so the allocation is resident.
    return harness.Cmd([sys.executable, "-c", f"b = bytearray({mb} * 2**20); b[::4096] = b'x' * len(b[::4096])"],
                       label=f"{mb} MB")


def test_peak_rss_and_ratio(results_dir):
    order = []
    ours, anchor = _alloc(300), _alloc(60)
    ours.before, anchor.before = (lambda: order.append("ours")), (lambda: order.append("anchor"))
    row = harness.compare("alloc", ours, anchor, repeats=2, what="allocation")
    assert order == ["ours", "anchor", "ours", "anchor"]
    assert 0.30 <= row["ours"]["peak_rss_gb"] < 0.45
    assert 0.06 <= row["anchor"]["peak_rss_gb"] < 0.2
    assert row["ratio"]["peak_rss_gb"] == pytest.approx(row["ours"]["peak_rss_gb"] / row["anchor"]["peak_rss_gb"],
                                                        rel=1e-2)
    saved = json.loads((results_dir / f"{harness.machine_name()}.json").read_text())
    assert saved["benchmarks"]["alloc"]["ratio"] == row["ratio"]
    assert saved["machine"]["cores"] >= 1
    table = report.render(saved)
    assert "### alloc" in table and "| **ratio** |" in table and "300 MB" in table


def test_failing_command_names_its_output(results_dir):
    with pytest.raises(RuntimeError, match=r"(?s)exited 3:.*boom"):
        harness.measure(harness.Cmd([sys.executable, "-c", "print('boom'); raise SystemExit(3)"]))


def test_peak_rss_is_the_commands_not_the_callers(results_dir):
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # this process is now > 400 MB resident
    run = harness.measure(_alloc(20))
    assert run.peak_rss_gb < 0.15
    del ballast


def test_cpu_seconds_are_the_commands_and_its_childrens(results_dir):
    """Busy work counts, sleeping does not, and a child the command waits for counts too."""
    busy = "import time; t = time.process_time(); exec('while time.process_time() - t < 0.6: pass')"
    spin = harness.measure(harness.Cmd([sys.executable, "-c", busy]))
    child = harness.measure(harness.Cmd([sys.executable, "-c",
                                         f"import subprocess, sys; subprocess.run([sys.executable, '-c', {busy!r}])"]))
    idle = harness.measure(harness.Cmd([sys.executable, "-c", "import time; time.sleep(0.8)"]))
    assert spin.cpu_s >= 0.6 and child.cpu_s >= 0.6
    assert idle.cpu_s < 0.5 and idle.wall_s >= 0.8


@pytest.mark.parametrize("args", [["--repeats"], ["--repeats", "0"], ["--repeats", "two"]])
def test_gpu_bench_refuses_a_bad_repeat_count(args):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", *args], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "--repeats needs a whole number of runs, 1 or more" in proc.stderr
    assert "Traceback" not in proc.stderr
