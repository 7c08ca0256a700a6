from bitfit.data.tasks import SPLIT_SIZES, TASKS, builtin_records, is_correct


def test_the_builtin_task_is_the_same_on_every_call():
    assert builtin_records("train") == builtin_records("train")
    assert builtin_records("heldout") == builtin_records("heldout")


def test_train_and_heldout_share_no_question():
    def questions(split):
        return {(r["instruction"], r["input"]) for r in builtin_records(split)}

    train, heldout = questions("train"), questions("heldout")
    assert len(train) == SPLIT_SIZES["train"] and len(heldout) == SPLIT_SIZES["heldout"]
    assert not train & heldout


def test_every_task_appears_equally_in_both_splits():
    for split in SPLIT_SIZES:
        names = [r["task"] for r in builtin_records(split)]
        assert {name: names.count(name) for name in TASKS} == {name: len(names) // len(TASKS) for name in TASKS}


def test_every_builtin_answer_is_right():
    for record in builtin_records("train") + builtin_records("heldout"):
        items = record["input"].split()
        expected = {
            "sort": lambda: " ".join(map(str, sorted(map(int, items)))),
            "add": lambda: str(sum(map(int, items))),
            "reverse": lambda: " ".join(reversed(items)),
            "count": lambda: str(len(items)),
        }[record["task"]]()
        assert record["output"] == expected, record


def test_exact_match_reads_the_first_line_and_ignores_surrounding_space():
    assert is_correct(" 1 2 3 \nmore text", "1 2 3")
    assert not is_correct("1 2 3 4", "1 2 3")
    assert not is_correct("", "1")
