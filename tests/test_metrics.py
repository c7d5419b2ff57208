import pytest

from pipeline.metrics import score_answers

REF = '{"name":"Ken","quantity":2,"item":"lamp","color":"red","city":"Oslo"}'


def test_json_references_score_parsed_equality():
    preds = [
        REF,  # exact
        '  {"city": "Oslo", "name": "Ken", "quantity": 2, "item": "lamp", "color": "red"}\n',  # reordered
        '```json\n{"name":"Ken","quantity":2,"item":"lamp","color":"red","city":"Oslo"}\n```',  # fenced
        '{"name":"Ken","quantity":3,"item":"lamp","color":"red","city":"Oslo"}',  # wrong value
        '{"name":"Ken", "quantity":2',  # not JSON
    ]
    s = score_answers(preds, [REF] * 5)
    assert s["primary"] == "json_match" and s["n"] == 5
    assert (s["exact_match"], s["exact_match_count"]) == (20.0, 1)
    assert (s["json_valid"], s["json_valid_count"]) == (80.0, 4)
    assert (s["json_match"], s["json_match_count"]) == (60.0, 3)


def test_plain_text_references_use_exact_match():
    s = score_answers([" Paris ", "paris", "Rome"], ["Paris", "Paris", "Rome"])
    assert s["primary"] == "exact_match"
    assert s["exact_match"] == 66.7 and s["exact_match_count"] == 2
    assert "json_match" not in s


def test_quantity_as_string_does_not_match():
    pred = REF.replace("2", '"2"')
    assert score_answers([pred], [REF])["json_match"] == 0.0


def test_empty_and_mismatched():
    assert score_answers([], []) == {"n": 0, "primary": "exact_match", "exact_match": 0.0, "exact_match_count": 0}
    with pytest.raises(ValueError):
        score_answers(["a"], [])
