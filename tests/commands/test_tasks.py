"""The task layer: generators, splits, prompts, answer extraction, data files, the registry."""

import json

import pytest

from fastdca.tasks import (
    TASKS, DataFormatError, Example, FileTask, concat_letters, extract_choice, extract_number, extract_word,
    format_prompt, get_task, numbers_equal, parse_number, read_records,
)
from fastdca.tasks.letters import LetterConcatenation
from fastdca.tasks.options import parse_task_options

PAPER_CAUSAL_LAYERS = {"letter_concat": 20, "date_understanding": 10, "math401": 1, "addsub": 3,
                       "svamp": 3, "multiarith": 3, "singleeq": 3, "gsm8k": 3}


# -- registry ----------------------------------------------------------------------------------

def test_registry_and_paper_causal_layers():
    assert set(TASKS) == set(PAPER_CAUSAL_LAYERS)
    for name, lp in PAPER_CAUSAL_LAYERS.items():
        assert get_task(name).causal_layers == lp


def test_task_options_from_the_command_line():
    assert parse_task_options(["n_train=1200", "train_variants=second_last", "test_fraction=0.1", "seed=x"]) == {
        "n_train": 1200, "train_variants": ("second_last",), "test_fraction": 0.1, "seed": "x"}
    assert parse_task_options(["train_variants=second_last,last"]) == {"train_variants": ("second_last", "last")}
    with pytest.raises(ValueError, match="--task-option takes KEY=VALUE; got 'n_train'"):
        parse_task_options(["n_train"])


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError) as e:
        get_task("letter_concatenations")
    for name in TASKS:
        assert name in str(e.value)


def test_missing_data_file_task():
    with pytest.raises(ValueError, match="does not exist"):
        get_task("no/such/file.jsonl")


def test_aliases():
    assert get_task("Letter-Concatenation").name == "letter_concat"
    assert get_task("AddSub").name == "addsub"


def test_unknown_split():
    with pytest.raises(ValueError, match="no split"):
        get_task("math401").examples("validation")


# -- letter concatenation ----------------------------------------------------------------------

def test_letters_hand_checked():
    assert concat_letters("GALLEGOS MORAN", "second_last") == "OA"
    assert concat_letters("GALLEGOS MORAN", "last") == "SN"
    assert concat_letters("GALLEGOS MORAN", "first") == "GM"
    assert concat_letters("GALLEGOS MORAN", "second") == "AO"
    assert concat_letters("AL ROE", "second_last") == "AO"
    ex = LetterConcatenation.make_example("GALLEGOS MORAN", "second_last", "x")
    assert ex.target == ex.answer == "OA"
    assert '"GALLEGOS MORAN"' in ex.prompt and "second-last letters" in ex.prompt
    assert ex.prompt.endswith("### Response:\n")


def test_letters_deterministic_and_disjoint():
    a, b = LetterConcatenation(n_train=400, n_test=100), LetterConcatenation(n_train=400, n_test=100)
    for split in ("train", "test"):
        assert a.examples(split) == b.examples(split)
    train, test = a.examples("train"), a.examples("test")
    assert len(train) == 400 and len(test) == 100
    # every answer is right, every test item is the second-last variant
    for e in train + test:
        assert e.answer == concat_letters(e.meta["name"], e.meta["variant"])
    assert {e.meta["variant"] for e in test} == {"second_last"}
    variants = [e.meta["variant"] for e in train]
    assert {v: variants.count(v) for v in set(variants)} == {"first": 100, "second": 100, "second_last": 100,
                                                             "last": 100}
    # no pair, and not even a single name word, in both splits
    train_pairs = {e.meta["name"] for e in train}
    test_pairs = {e.meta["name"] for e in test}
    assert not train_pairs & test_pairs
    assert len(test_pairs) == 100
    train_words = {w for p in train_pairs for w in p.split()}
    assert not train_words & {w for p in test_pairs for w in p.split()}
    # the test set does not move when n_train changes; another seed gives another one
    assert LetterConcatenation(n_train=10).examples("test") == test
    assert LetterConcatenation(seed=1).examples("test") != test


def test_letters_bad_args():
    with pytest.raises(ValueError, match="variant"):
        LetterConcatenation(test_variant="third")
    with pytest.raises(ValueError, match="variant"):
        concat_letters("A B", "middle")


# -- the other built-in tasks ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["date_understanding", "math401", "addsub", "svamp", "multiarith", "singleeq",
                                  "gsm8k"])
def test_builtin_splits_deterministic_and_disjoint(name):
    t1, t2 = get_task(name), get_task(name)
    train, test = t1.examples("train"), t1.examples("test")
    assert train and test
    assert train == t2.examples("train") and test == t2.examples("test")
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    if name not in ("date_understanding", "math401"):  # word problems: no near-duplicate question either
        norm = lambda e: "".join(ch for ch in e.prompt.lower() if ch.isalnum())  # noqa: E731
        assert not {norm(e) for e in train} & {norm(e) for e in test}
    for e in test:
        assert e.prompt.endswith("### Response:\n") and e.answer is not None and e.target
        assert t1.is_correct(f"The answer is {e.answer}.", e)
    # the reference target scores right (the word problems' chains of thought are model-written and
    # sometimes wrong: require most of them)
    ok = sum(t1.is_correct(e.target, e) for e in test)
    assert ok == len(test) if name in ("date_understanding", "math401") else ok >= 0.5 * len(test)


def test_date_understanding_options():
    task = get_task("date_understanding")
    exs = task.examples("train") + task.examples("test")
    assert len(exs) == 369
    assert len({e.answer for e in exs}) >= 5  # options are shuffled: the right one is not always (A)
    e = exs[0]
    assert e.target == f"({e.answer}) {e.choices['ABCDEF'.index(e.answer)]}"
    assert task.is_correct(e.choices["ABCDEF".index(e.answer)], e)  # the option text alone counts
    wrong = next(c for c in "ABCDEF"[: len(e.choices)] if c != e.answer)
    assert not task.is_correct(f"The answer is ({wrong}).", e)


def test_math401_hand_checked():
    task = get_task("math401")
    ex = next(e for e in task.examples("train") + task.examples("test") if e.meta["query"] == "5+9=")
    assert ex.answer == "14" and ex.prompt.endswith("Calculate: 5+9=\n\n### Response:\n")
    assert task.is_correct("14", ex) and task.is_correct("5+9=14", ex) and task.is_correct("14.0000", ex)
    assert not task.is_correct("5", ex)


def test_accuracy_and_score():
    task = get_task("letter_concat", n_train=8, n_test=4)
    exs = task.examples("test")
    texts = [exs[0].answer, "nonsense", f"The answer is {exs[2].answer}.", exs[3].answer.lower()]
    rows = task.score(texts, exs)
    assert [r["correct"] for r in rows] == [True, False, True, True]
    assert task.accuracy(texts, exs) == 0.75
    with pytest.raises(ValueError):
        task.accuracy(texts[:2], exs)


# -- answer extraction -------------------------------------------------------------------------

@pytest.mark.parametrize("a,b,eq", [
    ("1,234.0", 1234, True), ("1234", "1,234", True), ("$12", "12.00", True), ("50%", "50", True),
    ("2/3", "0.6666666666666666", True), ("-3", "-3.0", True), ("0.5", ".5", True),
    ("989566528173", "989566528173.0", True), ("4", "5", False), ("4", "four", False), ("1/0", "0", False),
    ("0.125", "0.1254", True), ("0.125", "0.127", False),
])
def test_numbers_equal(a, b, eq):
    assert numbers_equal(a, b) is eq


@pytest.mark.parametrize("text,fallback,expected", [
    ("... so 7 - 3 = 4 crayons. The answer is 4.", "last", "4"),
    ("The answer is 1,234.5 dollars. Check: 3 + 4", "last", "1234.5"),
    ("He has 30 - 15 = 15 new books", "last", "15"),
    ("The answer is -7.", "last", "-7"),
    ("5-3=2", "first", "2"),
    ("14\n\n### Instruction:\nCalculate: 3+4=", "first", "14"),
    ("There are 12 apples and 7 pears", "first", "12"),
    ("no digits here", "last", None),
    ("Answer: $480", "last", "480"),
])
def test_extract_number(text, fallback, expected):
    assert extract_number(text, fallback=fallback) == expected


def test_parse_number_rejects():
    assert parse_number("abc") is None and parse_number("") is None and parse_number(None) is None
    assert parse_number(float("nan")) is None


@pytest.mark.parametrize("text,expected", [
    ("(B) 05/01/2021", "B"), ("The answer is C.", "C"), ("answer is (D)", "D"), ("A) yes", "A"),
    ("05/01/2021", "B"), ("I think 02/23/2021 or 05/01/2021", "A"), ("(Z) nothing", None), ("no idea", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, ("02/23/2021", "05/01/2021", "03/11/2021", "05/09/2021")) == expected


@pytest.mark.parametrize("text,expected", [
    ("OA", "OA"), ("oa", "OA"), ('The answer is "oa".', "OA"), ("Sure! OA is it", "OA"),
    ("OA\n### Instruction", "OA"), ("", None),
])
def test_extract_word(text, expected):
    assert extract_word(text) == expected


# -- user data files ---------------------------------------------------------------------------

def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_user_file_json_and_jsonl(tmp_path):
    recs = [{"instruction": "What is 2+3?", "input": "", "output": "2 + 3 = 5. The answer is 5.", "answer": "5.0"},
            {"instruction": "Pick one", "input": "(A) x (B) y", "output": "The answer is B", "answer": "B"},
            {"instruction": "Capital of France?", "output": "Paris"}]
    pj = _write(tmp_path, "d.json", json.dumps(recs, indent=2))
    pl = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n\n")
    for p in (pj, pl):
        task = get_task(str(p))
        assert isinstance(task, FileTask) and task.name == "d"
        exs = task.examples("test")
        assert [e.answer_type for e in exs] == ["number", "choice", "text"]
        assert exs[0].prompt == format_prompt("What is 2+3?")
        assert "### Input:\n(A) x (B) y" in exs[1].prompt
        assert exs[2].answer == "Paris"
        assert task.accuracy(["The answer is 5", "(B)", "paris"], exs) == 1.0
    split = get_task(str(pj), test_size=1)
    assert len(split.examples("train")) == 2 and len(split.examples("test")) == 1


@pytest.mark.parametrize("name,text,where", [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n', "line 2"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"output": "b"}\n', "line 3"),
    ("bad.jsonl", '{"instruction": "a"}\n', "line 1"),
    ("bad.jsonl", '["a"]\n', "line 1"),
    ("bad.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": 3, "output": "b"}\n]', "line 3"),
    ("bad.json", '[\n {"instruction": "a", "output": "b"},\n\n {"instruction": "a" "output": "b"}\n]', "line 4"),
    ("bad.json", '[\n {"instruction": "a", "output": "b"}\n {"instruction": "a", "output": "b"}\n]', "line 3"),
    ("bad.json", "[]", "empty"),
    ("bad.json", "   \n", "empty"),
])
def test_malformed_file_names_the_line(tmp_path, name, text, where):
    p = _write(tmp_path, name, text)
    with pytest.raises(DataFormatError) as e:
        read_records(p)
    assert where in str(e.value) and str(p) in str(e.value)
    with pytest.raises(DataFormatError):
        get_task(str(p))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "nope.json")


def test_example_is_plain_data():
    e = Example(id="x", prompt="p", target="t", answer="a")
    assert e.answer_type == "text" and e.choices == ()

