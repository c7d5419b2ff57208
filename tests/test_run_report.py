"""The run report (pipeline/run_report.py) of the real SmolLM2 run, rendered in a real headless Chromium.

    pytest -q tests/test_run_report.py

The page of `shipped_run` (02-10) plus a 05 eval run on a linked copy (4 answered samples) is loaded
by Debian's `chromium --headless`; from the DOM it builds, every section's table must hold the numbers
of the JSON files the phases wrote, every embedded plot must decode and not be blank, and so must
the screenshot. Also: a run with only some phases done, a missing run folder, an interrupted write.
"""

from __future__ import annotations

import base64
import io
import json
import os
import resource
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageStat

from pipeline import cli
from pipeline.config import KEYS, load_config
from pipeline.errors import MissingInputError
from pipeline.export_choice import choose_export, type_key
from pipeline.run_report import SECTIONS, write_report
from shipped_fixtures import SHIPPED

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium missing: `make setup` installs it (root)")
WINDOW = (1200, 2400)


def linked_copy(shipped_root: Path, models_dir: Path, keep: set[str] | None = None) -> Path:
    """A run folder whose phase outputs are symlinks to the shipped run's (read, never written):
    other test modules share that run. `keep`: only these outputs. eval/ is never linked (05 writes it)."""
    root = models_dir / shipped_root.name
    root.mkdir(parents=True)
    for child in shipped_root.iterdir():
        if child.name not in ("eval", "report.html") and (keep is None or child.name in keep):
            (root / child.name).symlink_to(child)
    return root


def run_cfg(models_dir: Path, **overrides):
    return load_config(None, {**SHIPPED, "models_dir": str(models_dir), **overrides}, env={})


def evaluated_copy(shipped_root: Path, models_dir: Path):
    """The shipped run plus 05 eval, scored on 4 test rows (the page's Evaluation section)."""
    from pipeline.phases.p05_evaluate import evaluate

    linked_copy(shipped_root, models_dir)
    cfg = run_cfg(models_dir, **{"eval.max_samples": 4, "eval.max_tokens": 48, "eval.show_samples": 2})
    evaluate(cfg)
    return cfg


@pytest.fixture(scope="module")
def evaluated_run(shipped_run, tmp_path_factory):
    return evaluated_copy(shipped_run.root, tmp_path_factory.mktemp("report") / "models")


# --------------------------------------------------------------------------------------------
# Reading the page the browser built


class Dom(HTMLParser):
    """Headings, tables (rows of cell texts, header row first), images and every URL attribute."""

    def __init__(self, text: str):
        super().__init__()
        self.headings, self.tables, self.images, self.urls, self.text = [], [], [], [], []
        self._cell = self._heading = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "h2":
            self._heading = []
        elif tag == "img":
            self.images.append(a)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "h2":
            self.headings.append("".join(self._heading).strip())
            self._heading = None

    def handle_data(self, data):
        self.text.append(data)
        for buf in (self._cell, self._heading):
            if buf is not None:
                buf.append(data)

    def table(self, *header: str) -> list[list[str]]:
        """The table whose header row starts with `header`, without that row."""
        found = [t for t in self.tables if t and tuple(t[0][:len(header)]) == header]
        assert len(found) == 1, f"{len(found)} tables with header {header}: {[t[0] for t in self.tables if t]}"
        return found[0][1:]


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # Its own profile folder: runs of this test in parallel do not share (and lock) one.
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={cwd / 'profile'}", *args]
    # Without the OpenBLAS preload `make test` sets for MLX: with it Chromium's GPU process fails to start
    # and the browser exits ("GPU process isn't usable"), even with --disable-gpu.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def rendered(page: Path, tmp_path: Path) -> tuple[Dom, Image.Image]:
    dump = chromium("--dump-dom", page.resolve().as_uri(), cwd=tmp_path)
    assert dump.returncode == 0 and "</table>" in dump.stdout, dump.stderr[-2000:]
    shot = tmp_path / "screenshot.png"
    out = chromium(f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", page.resolve().as_uri(),
                   cwd=tmp_path)
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    return Dom(dump.stdout), Image.open(shot)


def not_blank(img: Image.Image, what: str) -> None:
    img.load()
    stddev = ImageStat.Stat(img.convert("L")).stddev[0]
    assert stddev > 10, f"{what} is (almost) one colour: grey-level standard deviation {stddev:.1f}"
    colours = img.convert("L").getcolors(maxcolors=1 << 16) or []
    assert len(colours) > 20 or not colours, f"{what} has only {len(colours)} grey levels"


def number(cell: str) -> float:
    return float(cell.replace(",", "").split()[0])


def row_of(rows: list[list[str]], first: str) -> list[str]:
    found = [r for r in rows if r[0] == first]
    assert len(found) == 1, f"{first!r} in {[r[0] for r in rows]}"
    return found[0]


# --------------------------------------------------------------------------------------------


@needs_chromium
def test_report_of_the_shipped_run_in_headless_chromium(evaluated_run, tmp_path):
    cfg = evaluated_run
    root = Path(cfg.models_dir) / cfg.run
    page = write_report(cfg)
    assert page == root / "report.html"
    dom, shot = rendered(page, tmp_path)

    assert dom.headings == list(SECTIONS), dom.headings
    assert "not run yet" not in "".join(dom.text)
    assert "could not read" not in "".join(dom.text)
    # Self-contained: nothing is fetched (no URL but the embedded images' data: URIs).
    assert dom.urls and all(u.startswith("data:image/png;base64,") for u in dom.urls), [u[:40] for u in dom.urls]

    # 01 data: every split's rows and tokens.
    stats = json.loads((root / "data" / "manifest.json").read_text())["stats"]
    data = dom.table("split", "rows", "tokens")
    for split, s in stats.items():
        assert [number(c) for c in row_of(data, split)[1:3]] == [s["rows"], s["tokens"]]

    # 05 eval: base and adapter, test loss and the task metric, and the sample answers.
    results = json.loads((root / "eval" / "results.json").read_text())
    primary = results["primary_metric"]
    evals = dom.table("model", "test loss", "perplexity")
    header = next(t[0] for t in dom.tables if t and t[0][:2] == ["model", "test loss"])
    for name, key in (("base", "base"), ("base + adapter", "adapter")):
        row = row_of(evals, name)
        assert number(row[1]) == pytest.approx(results[key]["test_loss"], rel=1e-3)
        assert number(row[header.index(f"{primary} %")]) == pytest.approx(results[key]["metric"][primary], abs=0.05)
    tuned = results["adapter"]["metric"][primary]
    assert f"base + adapter {tuned:.4g} % ({results['scored_rows']} test rows" in "".join(dom.text)  # the headline
    samples = dom.table("prompt", "expected", "base", "base + adapter")
    assert len(samples) == len(results["samples"]) == 2
    assert [r[3] for r in samples] == [s["adapter"][:300] for s in results["samples"]]

    # 10 verify: every GGUF with its size, KL, top-1 and task metric as verify/report.json has them.
    verify = json.loads((root / "verify" / "report.json").read_text())
    ggufs = dom.table("file", "type", "size", "bits per weight", "KL to MLX", "top-1 %")
    exported = [r for r in verify["models"] if not r["file"].endswith("(MLX)")]
    assert {type_key(r) for r in exported} >= {"F16", "Q8_0", "F16+LORA"}
    for r in verify["models"]:
        row = row_of(ggufs, r["file"])
        assert number(row[2]) == pytest.approx(r["size_bytes"] / 1e6, abs=0.05)
        assert number(row[7]) == pytest.approx(r["metric"][verify["primary_metric"]], abs=0.05)
        if r in exported:
            assert row[1] == type_key(r) and row[8] == "passed"
            assert number(row[4]) == pytest.approx(r["kl"], rel=1e-3)
            assert number(row[5]) == pytest.approx(r["top1_percent"], abs=0.01)

    # The file each runtime gets is what `make install` / `serve` choose (LM Studio: never a LoRA pair).
    runtimes = dom.table("runtime", "file(s)", "type")
    for runtime, pair in (("LM Studio", False), ("Ollama", True), ("llama.cpp", True)):
        choice = choose_export(cfg, allow_pair=pair)
        assert row_of(runtimes, runtime)[1:3] == [" + ".join(f.name for f in choice.files), choice.type]

    # Timings: one row per phase manifest, with its seconds.
    times = dom.table("phase", "output", "finished", "seconds")
    for m in root.glob("*/manifest.json"):
        recorded = json.loads(m.read_text())
        row = next(r for r in times if r[1] == f"{m.parent.name}/")
        assert row[0] == recorded["phase"] and number(row[3]) == pytest.approx(recorded["seconds"], abs=0.06)

    # The fuse section: its survival verdict and size.
    fused = json.loads((root / "fused" / "manifest.json").read_text())
    fuse_row = row_of(dom.table("folder", "fuse"), "fused/")
    assert fuse_row[1] == "--de-quantize" and fuse_row[-1] == ("LOST" if fused["survival"]["lost"] else "survived")

    # Plots: the loss curves and size vs quality, each a PNG that decodes and is not blank.
    alts = [img.get("alt", "") for img in dom.images]
    assert any(a.startswith("loss curves") for a in alts) and any(a.startswith("GGUF size vs quality") for a in alts)
    for img in dom.images:
        png = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert png.format == "PNG" and png.width >= 400 and png.height >= 300
        not_blank(png, img["alt"])
    assert shot.size == WINDOW
    not_blank(shot, "the screenshot")


@pytest.mark.parametrize("done, not_run", [
    ({"base", "base-quantized", "data", "adapters"}, ["eval", "fuse", "gguf", "verify"]),
    ({"base", "base-quantized", "data", "adapters", "fused", "hf", "gguf"}, ["eval", "verify"]),
])
def test_report_of_a_run_with_some_phases_done(shipped_run, tmp_path, done, not_run):
    """The sections of the phases done are filled; the others name their make target."""
    linked_copy(shipped_run.root, tmp_path, keep=done)
    dom = Dom(write_report(run_cfg(tmp_path)).read_text())
    assert dom.headings == list(SECTIONS)
    text = " ".join(dom.text)
    for target in ["data", "train", "eval", "fuse", "gguf", "verify"]:
        assert (f"not run yet: `make {target}`" in text) == (target in not_run), target
    assert "could not read" not in text
    assert dom.table("split", "rows", "tokens")
    assert [img["alt"] for img in dom.images] == ["loss curves: train and validation loss per step"]
    assert {r[1] for r in dom.table("phase", "output", "finished", "seconds")} == {f"{d}/" for d in done} | {""}
    if "gguf" in done:  # exported, not verified: the files with their sizes, no KL yet
        gguf = json.loads((shipped_run.root / "gguf" / "manifest.json").read_text())["outputs"]["files"]
        rows = dom.table("file", "type", "size", "bits per weight")
        assert sorted(r[0] for r in rows) == sorted(f["file"] for f in gguf.values())
        assert "not verified yet" in text


def test_report_of_an_empty_run_folder(tmp_path):
    """Nothing finished but a data manifest cut short: that section says so, every other still renders."""
    (tmp_path / "fresh" / "data").mkdir(parents=True)
    (tmp_path / "fresh" / "data" / "manifest.json").write_text('{"phase": "01_prepare_data", "stats": {')
    cfg = load_config(None, {"models_dir": str(tmp_path), "run": "fresh"}, env={})
    dom = Dom(write_report(cfg).read_text())
    text = " ".join(dom.text)
    assert "could not read this phase's output: JSONDecodeError" in text
    for target in ("train", "eval", "fuse", "gguf", "verify", "demo"):
        assert f"not run yet: `make {target}`" in text
    assert row_of(dom.table("key", "value"), "run")[1] == "'fresh'"  # the config as loaded now
    assert not dom.images


def test_missing_run_folder_is_a_clear_error(tmp_path):
    cfg = load_config(None, {"models_dir": str(tmp_path), "run": "nope"}, env={})
    with pytest.raises(MissingInputError, match="make demo"):
        write_report(cfg)
    result = CliRunner().invoke(cli.main, ["report", "--run", "nope", "--models-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert str(tmp_path / "nope") in result.output and "--run" in result.output
    assert not (tmp_path / "nope").exists()


def test_a_write_cut_short_leaves_the_previous_page(shipped_run, tmp_path):
    """A real short write (the file-size limit of the child process): the previous page stays whole
    and no temporary is left beside it."""
    root = linked_copy(shipped_run.root, tmp_path, keep={"data", "adapters"})
    page = write_report(run_cfg(tmp_path))
    before = page.read_bytes()
    assert len(before) > 40_000  # the loss plot alone is larger than the limit below
    page.write_bytes(before.replace(b"</body>", b"<p>previous page</p></body>"))
    previous = page.read_bytes()
    env = {k: v for k, v in os.environ.items() if k not in {f.metadata["env"] for f in KEYS.values()}}
    env.update(PYTHONPATH=str(ROOT), MLX_PIPELINE_NO_REEXEC="1")
    limit = 20_000
    child = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "report", "--run", SHIPPED["run"], "--models-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert child.returncode == 2, child.stderr[-2000:]
    assert f"Could not write {page}" in child.stderr, child.stderr[-2000:]
    assert page.read_bytes() == previous
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
