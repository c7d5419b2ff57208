"""Phase 01 with the real SmolLM2 tokenizer (loaded from the embedded GGUF, nothing downloaded)."""

import json
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import cli
from pipeline.config import KEYS, load_config
from pipeline.data.formats import check_row, prompt_and_answer, read_jsonl
from pipeline.errors import DataError, MissingInputError
from pipeline.manifest import write_manifest
from pipeline.phases.p01_prepare_data import prepare_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def _smollm2_tokenizer_dir(tmp_path_factory, smollm2_tokenizer_dir):
    """The SmolLM2 tokenizer as a finished base-model folder (with the base phase's manifest)."""
    out = tmp_path_factory.mktemp("smollm2-base") / "base"
    shutil.copytree(smollm2_tokenizer_dir, out)
    write_manifest(out, "02_fetch_base_model", {}, time.time(), {}, {})
    return out


@pytest.fixture
def make_cfg(tmp_path, _smollm2_tokenizer_dir):
    """Config for run 't' under tmp_path, with the tokenizer as its base model."""

    def make(source, base=True, seed=0, mask=None, **data_keys):
        if base and not (tmp_path / "t" / "base").exists():
            shutil.copytree(_smollm2_tokenizer_dir, tmp_path / "t" / "base")
        keys = {"models_dir": str(tmp_path), "run": "t", "seed": seed, "data.source": str(source)}
        if mask:
            keys["train.mask"] = mask
        keys.update({f"data.{k}": v for k, v in data_keys.items()})
        return load_config(None, keys, env={})

    return make


def chat(i, answer="yes"):
    return {"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": answer}]}


def write_rows(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def manifest(out_dir: Path) -> dict:
    return json.loads((out_dir / "manifest.json").read_text())


BAD_ROWS = [
    chat(1),
    chat(2),
    '{"messages": [{"role": "user", "content": "hi"}',  # line 3: truncated JSON
    chat(4),
    {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},  # line 5
    chat(6),
]


def test_sample_writes_three_splits_manifest_and_stats(make_cfg):
    cfg = make_cfg("sample", sample_rows=60)
    res = prepare_data(cfg)
    assert res.counts == {"train": 48, "valid": 6, "test": 6} and res.format == "chat"
    m = manifest(res.out_dir)
    assert m["phase"] == "01_prepare_data" and m["format"] == "chat"
    assert m["inputs"] == {"sample": "json-extract", "rows": 60, "seed": 0}
    for split, n in res.counts.items():
        rows, errors = read_jsonl(res.out_dir / f"{split}.jsonl")
        assert len(rows) == n and not errors
        assert m["outputs"][split]["rows"] == n
        st = m["stats"][split]
        assert st["rows"] == n and st["mean"] <= st["p95"] <= st["max"] < 200
        assert st["tokens"] == pytest.approx(st["mean"] * n, abs=n)
    first = (res.out_dir / "train.jsonl").read_text()
    prepare_data(cfg)  # the same seed gives the same files
    assert (res.out_dir / "train.jsonl").read_text() == first


def test_single_file_is_split_by_seed(make_cfg, tmp_path):
    rows = [{"prompt": f"2 + {i} =", "completion": f" {2 + i}"} for i in range(30)]
    src = write_rows(tmp_path / "in" / "all.jsonl", rows)
    res = prepare_data(make_cfg(src))
    assert res.counts == {"train": 24, "valid": 3, "test": 3} and res.format == "completions"
    written = [r for s in ("train", "valid", "test") for r in read_jsonl(res.out_dir / f"{s}.jsonl")[0]]
    assert sorted(map(json.dumps, written)) == sorted(map(json.dumps, rows))  # a partition
    assert manifest(res.out_dir)["inputs"]["input"]["sha256"]
    valid = read_jsonl(res.out_dir / "valid.jsonl")[0]
    prepare_data(make_cfg(src, seed=1))
    assert read_jsonl(res.out_dir / "valid.jsonl")[0] != valid  # another seed, another split


def test_small_file_still_gets_one_valid_and_test_row(make_cfg, tmp_path):
    src = write_rows(tmp_path / "in" / "few.jsonl", [chat(i) for i in range(6)])
    assert prepare_data(make_cfg(src)).counts == {"train": 4, "valid": 1, "test": 1}


def test_folder_without_test(make_cfg, tmp_path):
    folder = tmp_path / "in"
    write_rows(folder / "train.jsonl", [{"text": f"line number {i}"} for i in range(6)])
    write_rows(folder / "valid.jsonl", [{"text": "a validation line"}, "", {"text": "another one"}])
    res = prepare_data(make_cfg(folder))
    assert res.counts == {"train": 6, "valid": 2, "test": 0} and res.format == "text"
    assert not (res.out_dir / "test.jsonl").exists()  # mlx-lm cannot read an empty split
    assert manifest(res.out_dir)["outputs"]["test"] == {"path": None, "rows": 0, "sha256": None}


def test_malformed_rows_are_all_reported_and_nothing_written(make_cfg, tmp_path):
    src = write_rows(tmp_path / "in" / "file.jsonl", BAD_ROWS)
    cfg = make_cfg(src)
    with pytest.raises(DataError) as e:
        prepare_data(cfg)
    msg = str(e.value)
    assert msg.splitlines()[0].startswith("2 error") and "nothing was written" in msg.splitlines()[0]
    assert "file.jsonl:3: not valid JSON" in msg
    assert "file.jsonl:5: messages[1].role 'bot' not one of system, user, assistant, tool" in msg
    assert not (tmp_path / "t" / "data").exists()


@pytest.mark.parametrize(
    "row, reason",
    [
        ([1, 2], "row is not a JSON object"),
        ({"input": "x"}, "missing 'messages' (chat), 'prompt'+'completion' (completions) or 'text'"),
        ({"prompt": "x"}, "need both 'prompt' and 'completion'"),
        ({"text": "x"}, "format 'text' differs from the file's format 'chat'"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "x"}]}, "last message must be from the assistant"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
         "messages[0].content must be a string"),
    ],
)
def test_row_reasons(tmp_path, row, reason):
    rows, errors = read_jsonl(write_rows(tmp_path / "f.jsonl", [chat(0), row]))
    assert len(rows) == 1 and len(errors) == 1
    assert errors[0].startswith(f"{tmp_path / 'f.jsonl'}:2: ") and reason in errors[0]


def test_prompt_and_answer():
    assert prompt_and_answer(chat(1, "ok")) == ([{"role": "user", "content": "question 1?"}], "ok")
    assert prompt_and_answer({"prompt": "p", "completion": "c"}) == ([{"role": "user", "content": "p"}], "c")
    assert check_row({"text": "t"}) == ("text", None)


def test_duplicates_and_train_leaks_are_removed_and_counted(make_cfg, tmp_path):
    folder = tmp_path / "in"
    write_rows(folder / "train.jsonl", [chat(i) for i in range(6)] + [chat(0), chat(1)])
    write_rows(folder / "valid.jsonl", [chat(10), chat(10), chat(2)])
    write_rows(folder / "test.jsonl", [chat(20), chat(3)])
    res = prepare_data(make_cfg(folder))
    assert res.counts == {"train": 6, "valid": 1, "test": 1}
    assert res.removed["duplicates"] == {"train": 2, "valid": 1}
    assert res.removed["in_train"] == {"valid": 1, "test": 1}
    assert manifest(res.out_dir)["removed"] == res.removed


def test_single_file_duplicates_removed_before_split(make_cfg, tmp_path):
    src = write_rows(tmp_path / "in" / "d.jsonl", [chat(i % 10) for i in range(20)])
    res = prepare_data(make_cfg(src))
    assert sum(res.counts.values()) == 10 and res.removed["duplicates"] == {"input": 10}


LONG = "a fairly long sentence that keeps going " * 40  # ~320 tokens


@pytest.mark.parametrize("policy", ["drop", "truncate", "error"])
def test_overlong_policies(make_cfg, tmp_path, policy):
    rows = [chat(i) for i in range(8)] + [chat(8, LONG)]
    src = write_rows(tmp_path / "in" / "file.jsonl", rows)
    cfg = make_cfg(src, max_seq_length=64, overlong=policy, valid_fraction=0.2, test_fraction=0.0)
    if policy == "error":
        with pytest.raises(DataError) as e:
            prepare_data(cfg)
        assert "file.jsonl:9: " in str(e.value) and "tokens > max_seq_length 64" in str(e.value)
        assert not (tmp_path / "t" / "data").exists()
        return
    res = prepare_data(cfg)
    m = manifest(res.out_dir)
    total = sum(res.counts.values())
    if policy == "drop":
        assert total == 8 and sum(res.removed["overlong"].values()) == 1
        assert max(st["max"] for st in res.stats.values()) <= 64
    else:
        assert total == 9 and sum(m["overlong"]["truncated"].values()) == 1
        assert max(st["max"] for st in res.stats.values()) > 64  # mlx-lm truncates when training


def test_dropped_overlong_rows_are_named_with_their_length(make_cfg, tmp_path, capsys):
    """Each dropped row by file:line and tokens vs the limit, in the manifest and in the output,
    whose list stops at 20 and says how many more."""
    rows = [chat(i) for i in range(10)] + [chat(100 + i, LONG + "x" * i) for i in range(23)]
    src = write_rows(tmp_path / "in" / "file.jsonl", rows)
    res = prepare_data(make_cfg(src, max_seq_length=64, overlong="drop", valid_fraction=0.2, test_fraction=0.0))
    listed = manifest(res.out_dir)["overlong"]["rows"]
    assert sorted(int(r["row"].rsplit(":", 1)[1]) for r in listed) == list(range(11, 34))
    assert all(r["row"].startswith(f"{src}:") and r["tokens"] > 64 for r in listed)
    out = capsys.readouterr().out
    named = [line for line in out.splitlines() if line.strip().startswith("dropped: ")]
    assert len(named) == 20 and "... and 3 more" in out
    first = listed[0]
    assert f"dropped: {first['row']} ({first['split']}): {first['tokens']} tokens > max_seq_length 64" in out


def test_jsonl_with_a_utf8_byte_order_mark_is_read(make_cfg, tmp_path):
    folder = tmp_path / "in"
    for name, rows in (("train", [chat(i) for i in range(5)]), ("valid", [chat(9)])):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (folder / f"{name}.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jsonl").write_bytes(text.encode("utf-8-sig"))
    rows, errors = read_jsonl(folder / "train.jsonl")
    assert errors == [] and rows[0] == chat(0)
    res = prepare_data(make_cfg(folder))
    assert res.counts["train"] == 5 and res.counts["valid"] == 1
    # Only the file's start may carry one: a BOM inside a line is still an error, named.
    (folder / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + (folder / "train.jsonl").read_bytes())
    assert read_jsonl(folder / "train.jsonl")[1][0].startswith(f"{folder / 'train.jsonl'}:1: not valid JSON")


def test_overlong_text_rows_are_truncated_by_tokens(make_cfg, tmp_path):
    folder = tmp_path / "in"
    write_rows(folder / "train.jsonl", [{"text": f"short {i}"} for i in range(4)] + [{"text": LONG}])
    write_rows(folder / "valid.jsonl", [{"text": "short valid"}])
    res = prepare_data(make_cfg(folder, max_seq_length=32, overlong="truncate"))
    assert res.counts["train"] == 5 and res.stats["train"]["max"] <= 32
    texts = [r["text"] for r in read_jsonl(res.out_dir / "train.jsonl")[0]]
    assert any(LONG.startswith(t) and len(t) < len(LONG) for t in texts)


def multi_turn(i):
    return {"messages": [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}."},
        {"role": "user", "content": f"And {i} + 2?"}, {"role": "assistant", "content": f"That one is {i + 2}."},
    ]}


@pytest.mark.parametrize("mask", ["assistant", "last", "none"])
def test_trained_and_masked_tokens_per_split(make_cfg, tmp_path, capsys, mask):
    """The manifest's trained/masked counts are encode_rows' on the written splits, under train.mask."""
    from transformers import AutoTokenizer

    from pipeline.data.trained_tokens import encode_rows

    src = write_rows(tmp_path / "in" / "chat.jsonl", [multi_turn(i) for i in range(12)])
    res = prepare_data(make_cfg(src, mask=mask))
    m = manifest(res.out_dir)
    assert m["train_mask"] == mask and m["config"]["train"]["mask"] == mask
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "t" / "base"))
    out = capsys.readouterr().out
    assert "trained" in out and "masked" in out and f"train.mask: {mask}" in out
    for split in ("train", "valid", "test"):
        enc = encode_rows(read_jsonl(res.out_dir / f"{split}.jsonl")[0], tok, mask)
        st = m["stats"][split]
        assert st["trained"] == sum(sum(e.mask) for e in enc) and st["tokens"] == sum(len(e.ids) for e in enc)
        assert st["trained"] + st["masked"] == st["tokens"]
        if mask == "none":
            assert st["masked"] == 0
        else:
            assert 0 < st["trained"] < st["tokens"]
        line = next(x for x in out.splitlines() if x.startswith(split))
        assert line.split()[-2:] == [str(st["trained"]), str(st["masked"])]
    if mask == "assistant":  # two answers a row: more trained than mlx-lm's last-message mask
        last = encode_rows(read_jsonl(res.out_dir / "train.jsonl")[0], tok, "last")
        assert m["stats"]["train"]["trained"] > sum(sum(e.mask) for e in last)


def test_too_little_data_fails(make_cfg, tmp_path):
    src = write_rows(tmp_path / "in" / "tiny.jsonl", [chat(i) for i in range(4)])
    with pytest.raises(DataError, match="train has 2 rows"):
        prepare_data(make_cfg(src))
    assert not (tmp_path / "t" / "data").exists()


@pytest.mark.parametrize("name", ["nope.jsonl", "data.csv"])
def test_wrong_path(make_cfg, tmp_path, name):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError) as e:
        prepare_data(make_cfg(tmp_path / name))
    assert name in str(e.value) and "Accepted: 'sample', a .jsonl file, or a folder" in str(e.value)


def test_folder_without_valid(make_cfg, tmp_path):
    write_rows(tmp_path / "in" / "train.jsonl", [chat(i) for i in range(6)])
    with pytest.raises(DataError, match="no valid.jsonl"):
        prepare_data(make_cfg(tmp_path / "in"))


def test_missing_base_names_the_command(make_cfg, tmp_path):
    with pytest.raises(MissingInputError, match="make base"):
        prepare_data(make_cfg("sample", base=False, sample_rows=20))
    assert not (tmp_path / "t" / "data").exists()


@pytest.fixture
def clean_env(monkeypatch):
    for f in KEYS.values():
        if f.metadata["env"]:
            monkeypatch.delenv(f.metadata["env"], raising=False)


def test_cli_reports_bad_rows_and_exits_2(tmp_path, clean_env):
    bad = write_rows(tmp_path / "in" / "file.jsonl", BAD_ROWS)
    args = ["data", "--models-dir", str(tmp_path), "--run", "t", "--data", str(bad)]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2
    assert "file.jsonl:3:" in result.output and "file.jsonl:5:" in result.output
    assert "Traceback" not in result.output


def test_cli_help_lists_every_option():
    out = CliRunner().invoke(cli.main, ["data", "--help"]).output
    for flag in ["--data", "--sample-rows", "--valid-fraction", "--test-fraction", "--max-seq-length",
                 "--overlong", "--run", "--models-dir", "--seed", "--test-mode", "--config"]:
        assert flag in out
    assert "drop|truncate|error" in out


def test_script_docstring_starts_with_its_command():
    script = ROOT / "scripts" / "phase1-prepare-data" / "01_prepare_data.py"
    assert script.read_text().startswith('"""python scripts/phase1-prepare-data/01_prepare_data.py ')
