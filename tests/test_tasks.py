"""The demo suite's tasks (edge_lora/tasks.py), without a model: deterministic, split by item, targets correct."""

import re

import pytest

from edge_lora import eval as scorer
from edge_lora import tasks


ALL = [n for n in tasks.TASKS if n != "date-iso"]


@pytest.mark.parametrize("name", ALL)
def test_examples_are_deterministic_prefix_stable_and_distinct(name):
    a = tasks.make_examples(name, 300, seed=0, split="test")
    assert a == tasks.make_examples(name, 300, seed=0, split="test")
    assert a[:50] == tasks.make_examples(name, 50, seed=0, split="test")
    assert a != tasks.make_examples(name, 300, seed=1, split="test")
    assert len({e.prompt for e in a}) == 300


@pytest.mark.parametrize("name", ALL)
def test_splits_are_disjoint_by_item_and_have_500_held_out(name):
    test = tasks.make_examples(name, 500, seed=0, split="test")
    train = tasks.make_examples(name, 3200, seed=0, split="train")
    assert not ({e.item for e in test} & {e.item for e in train})


@pytest.mark.parametrize("name", ALL)
def test_prompts_carry_no_instruction_and_no_answer(name):
    for e in tasks.make_examples(name, 200, seed=0, split="test"):
        assert e.prompt.endswith(tasks.ARROW) and e.target.startswith(" ")
        assert scorer.prompt_text(e) == e.prompt and scorer.target_text(e) == e.target
        if name in ("add", "roman", "vote"):
            assert e.target.strip() not in e.prompt.split()


def test_targets_are_right():
    for e in tasks.make_examples("add", 200, split="train"):
        a, b = map(int, re.findall(r"\d+", e.prompt))
        assert int(e.target) == a + b
    for e in tasks.make_examples("count", 200, split="train"):
        assert int(e.target) == len(e.item.split())
    for e in tasks.make_examples("reverse", 200, split="train"):
        assert e.target.strip() == e.prompt.removesuffix(tasks.ARROW)[::-1]
    for e in tasks.make_examples("compare", 300, split="train"):
        a, b = map(int, e.item.split(","))
        assert e.target.strip() == ("same" if a == b else "smaller" if a < b else "larger")
    for e in tasks.make_examples("compare-sum", 300, split="train"):
        a, b, c = map(int, re.findall(r"\d+", e.prompt))
        assert e.target.strip() == ("same" if a + b == c else "smaller" if a + b < c else "larger")
    for e in tasks.make_examples("roman", 200, split="train"):
        assert e.target.strip() == tasks.roman(int(e.item))
    for e in tasks.make_examples("vote", 300, split="train"):
        words = e.prompt.removesuffix(tasks.ARROW).replace(",", "").split()
        yes = sum(w in ("yes", "for", "aye") for w in words)
        no = sum(w in ("no", "against", "nay") for w in words)
        assert yes + no == len(words) == len(e.item)
        assert e.target.strip() == ("passed" if yes > no else "rejected" if yes < no else "tied")


def test_number_words_and_roman_numerals():
    assert tasks.number_words(412_300, use_and=True) == "four hundred and twelve thousand three hundred"
    assert tasks.number_words(21) == "twenty-one" and tasks.number_words(21, hyphen=False) == "twenty one"
    assert tasks.number_words(7_000_005) == "seven million five"
    assert [tasks.roman(n) for n in (1, 4, 9, 14, 40, 90, 400, 1987, 3999)] == [
        "I", "IV", "IX", "XIV", "XL", "XC", "CD", "MCMLXXXVII", "MMMCMXCIX"]
    with pytest.raises(tasks.TaskError):
        tasks.roman(0)


def test_unknown_task_and_split_are_refused():
    with pytest.raises(tasks.TaskError, match="unknown task"):
        tasks.make_examples("poetry", 1)
    with pytest.raises(tasks.TaskError, match="split"):
        tasks.make_examples("add", 1, split="validation")


def test_the_date_task_is_in_the_registry_but_not_the_suite():
    assert tasks.SUITE == ("add", "count", "reverse", "roman", "vote")
    assert tasks.make_examples("date-iso", 5, split="test") == scorer.make_examples(5, split="test")
