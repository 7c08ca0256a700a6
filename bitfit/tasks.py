"""The built-in task: small instruction problems with exact answers, generated in code.

It is the data of the offline default run, so it needs no download, and because every answer is exact
a model's progress can be *checked* (exact match), not just read off a loss curve. The same code always
yields the same examples, and the train and held-out splits never share a question.
"""

import random
import zlib

# Each task: the instruction, and a function that draws (input, output) from a seeded generator.
WORDS = (
    "apple pear plum grape lemon mango peach cherry melon kiwi "
    "cat dog fox owl bear wolf duck frog lion goat "
    "red blue green pink gray gold black white brown cyan"
).split()


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 4))
    return " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return f"{a} {b}", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 4))
    return " ".join(words), " ".join(reversed(words))


def _count(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
    return " ".join(words), str(len(words))


TASKS = {
    "sort": ("Sort these numbers from smallest to largest.", _sort),
    "add": ("Add these two numbers.", _add),
    "reverse": ("Reverse the order of these words.", _reverse),
    "count": ("Count the words in this list.", _count),
}

# Fixed sizes of the two splits; a split expression such as "train[:400]" takes a slice of them.
# 800 = the default run's 100 optimizer steps of 8 examples (more with --epochs).
SPLIT_SIZES = {"train": 800, "heldout": 400}
HELDOUT_SHARE = 10  # one question in 10 belongs to the held-out split


def _is_heldout(instruction: str, input: str) -> bool:
    # A stable hash of the question decides its split, so the splits are disjoint at any size.
    return zlib.crc32(f"{instruction}\n{input}".encode()) % HELDOUT_SHARE == 0


def builtin_records(split: str) -> list[dict]:
    """All records of one split ("train" or "heldout"), tasks interleaved, the same on every call.

    Each record has the Alpaca keys (instruction, input, output) plus the task name.
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"the built-in task has splits {sorted(SPLIT_SIZES)}, not {split!r}")
    rng = random.Random(f"bitfit-builtin-{split}")
    want_heldout = split == "heldout"
    names = list(TASKS)
    records, seen = [], set()
    while len(records) < SPLIT_SIZES[split]:
        name = names[len(records) % len(names)]
        instruction, draw = TASKS[name]
        input, output = draw(rng)
        key = (instruction, input)
        if _is_heldout(instruction, input) != want_heldout or key in seen:
            continue
        seen.add(key)
        records.append({"instruction": instruction, "input": input, "output": output, "task": name})
    return records


def is_correct(generated: str, expected: str) -> bool:
    """Exact match on the first line of the generated answer, surrounding whitespace ignored."""
    lines = generated.strip().splitlines()
    return bool(lines) and lines[0].strip() == expected.strip()
