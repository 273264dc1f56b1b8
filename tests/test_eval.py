"""The date-to-ISO task and its scorer, without any model: generate_fn here is a plain Python function."""

import datetime as dt
import re

import pytest

from edge_lora import eval as task

ISO = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def test_make_examples_is_deterministic():
    assert task.make_examples(100, seed=3, split="test") == task.make_examples(100, seed=3, split="test")
    assert task.make_examples(100, seed=3) != task.make_examples(100, seed=4)


def test_make_examples_prefix_stable():
    # A longer run extends a shorter one, so "the first 200 held-out examples" means the same set everywhere.
    assert task.make_examples(300, seed=0, split="test")[:50] == task.make_examples(50, seed=0, split="test")


def test_splits_are_disjoint_by_date():
    train = {e.date for e in task.make_examples(3000, seed=0, split="train")}
    test = {e.date for e in task.make_examples(1000, seed=0, split="test")}
    assert train and test and not (train & test)
    assert all(task.split_of(d) == "test" for d in test)


def test_examples_are_distinct_and_cover_all_forms():
    examples = task.make_examples(500, seed=1, split="test")
    assert len({(e.date, e.form) for e in examples}) == 500
    assert {e.form for e in examples} == set(task.FORMS)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError):
        task.make_examples(1, split="validation")


def test_targets_are_valid_iso_of_the_date():
    for e in task.make_examples(200, seed=0, split="train"):
        target = task.target_text(e).strip()
        assert ISO.match(target)
        assert dt.date.fromisoformat(target) == e.date


def test_prompt_has_no_instruction_and_no_answer():
    for e in task.make_examples(200, seed=0, split="test"):
        prompt = task.prompt_text(e)
        assert prompt == e.surface + task.ARROW
        assert e.date.isoformat() not in prompt


def test_surface_forms():
    d = dt.date(2021, 3, 14)
    rendered = {name: form(d) for name, form in task.FORMS.items()}
    assert rendered["month_d_y"] == "March 14, 2021"
    assert rendered["the_dth_of_month"] == "the 14th of March, 2021"
    assert rendered["dd.mm.yyyy"] == "14.03.2021"
    assert rendered["weekday_month_d_y"] == "Sunday, March 14, 2021"
    assert [task._ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"]


@pytest.mark.parametrize("prediction", [
    "2021-03-14", " 2021-03-14", "2021-03-14  ", " 2021-03-14\nMarch 15, 2021 => 2021-03-15",
    " 2021-03-14<|im_end|>junk", "\t2021-03-14 \n",
])
def test_exact_match_normalisation_accepts(prediction):
    assert task.exact_match([prediction], [" 2021-03-14"]) == 1.0


@pytest.mark.parametrize("prediction", ["2021-3-14", "2021-03-14 2021", "\n2021-03-14", "14.03.2021", ""])
def test_exact_match_normalisation_rejects(prediction):
    assert task.exact_match([prediction], [" 2021-03-14"]) == 0.0


def test_exact_match_fraction_and_length_check():
    assert task.exact_match(["a", "b", "c", "x"], ["a", "b", "c", "d"]) == 0.75
    assert task.exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        task.exact_match(["a"], ["a", "b"])


def oracle(examples, wrong_every=0):
    """A generate_fn that looks the answer up; every ``wrong_every``-th example gets a wrong date. It adds
    the trailing text a real model may produce after the newline, which the scorer must ignore."""
    answers = {}
    for i, e in enumerate(examples):
        wrong = wrong_every and i % wrong_every == 0
        answers[task.prompt_text(e)] = "1999-01-01" if wrong else e.date.isoformat()
    return lambda prompts: [" " + answers[p] + "\nApril 2, 2020 =>" for p in prompts]


def test_score_perfect():
    examples = task.make_examples(40, seed=0, split="test")
    sizes = []
    generate = oracle(examples)

    def perfect(prompts):
        sizes.append(len(prompts))
        return generate(prompts)

    result = task.score(perfect, examples, batch_size=16)
    assert result["exact_match"] == 1.0 and result["n"] == 40
    assert result["failures"] == [] and result["n_failures"] == 0
    assert sizes == [16, 16, 8]
    assert set(result["by_form"].values()) == {1.0}


def test_score_wrong_and_partial():
    examples = task.make_examples(40, seed=0, split="test")
    wrong = task.score(lambda ps: ["1999-01-01"] * len(ps), examples, batch_size=16, max_failures=3)
    assert wrong["exact_match"] == 0.0 and wrong["n_failures"] == 40 and len(wrong["failures"]) == 3
    first = wrong["failures"][0]
    assert first["prompt"] == task.prompt_text(examples[0]) and first["form"] == examples[0].form
    assert first["target"] == examples[0].date.isoformat() and first["prediction"] == "1999-01-01"

    half = task.score(oracle(examples, wrong_every=2), examples, batch_size=7)
    assert half["exact_match"] == 0.5 and half["n_failures"] == 20


def test_score_rejects_wrong_number_of_completions():
    examples = task.make_examples(4, seed=0, split="test")
    with pytest.raises(ValueError):
        task.score(lambda ps: ps[:-1], examples, batch_size=4)
