import json

from pipeline.data.formats import check_row, prompt_and_answer
from pipeline.data.sample_task import ITEMS, SYSTEM, generate_rows


def test_same_seed_same_rows_other_seed_other_rows():
    assert generate_rows(200, 0) == generate_rows(200, 0)
    assert generate_rows(200, 0) != generate_rows(200, 1)
    assert generate_rows(50, 3) == generate_rows(200, 3)[:50]  # a prefix: more rows only add


def test_rows_are_unique_valid_chat_with_copyable_answers():
    rows = generate_rows(600, 0)
    assert len(rows) == 600
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == 600
    singular = {s for s, _ in ITEMS}
    for row in rows:
        assert check_row(row) == ("chat", None)
        prompt, answer = prompt_and_answer(row)
        assert prompt[0] == {"role": "system", "content": SYSTEM}
        sentence = prompt[1]["content"]
        data = json.loads(answer)
        assert list(data) == ["name", "quantity", "item", "color", "city"]
        assert answer == json.dumps(data, separators=(",", ":"))  # compact, fixed key order
        assert isinstance(data["quantity"], int) and 1 <= data["quantity"] <= 12
        assert data["item"] in singular
        for key in ("name", "item", "color", "city"):
            assert data[key] in sentence  # every value is copied from the sentence
        assert str(data["quantity"]) in sentence


def test_varied_templates():
    starts = {r["messages"][1]["content"].split()[0] for r in generate_rows(300, 0)}
    assert len(starts) > 10
