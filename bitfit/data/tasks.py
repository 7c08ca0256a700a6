"""The built-in tasks, generated in code: the data of the offline default runs, needing no download.

    builtin            small instruction problems with exact answers (sort, add, reverse, count): --task lm
    builtin-sentiment  short reviews, "positive" or "negative": --task classify
    builtin-topic      short sentences about sports, food, weather or computers: a second classification
    builtin-rating     short reviews and the 1-5 stars their wording gives: --task regress

Because every answer is exact, a model's progress can be *checked* (exact match, accuracy), not just read
off a loss curve. The same code always yields the same examples, and the train and held-out splits never
share a question or a sentence.
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


# --- the labelled tasks: a sentence and its class, or its number ---------------------------------------

ITEMS = ("movie", "book", "phone", "hotel", "meal", "laptop", "concert", "game", "jacket", "coffee", "show", "car")
# Words by stars: 1 awful ... 5 wonderful. The sentiment task reads 1-2 as negative and 4-5 as positive.
RATED_WORDS = {
    1: ("awful", "terrible", "horrible", "dreadful", "a waste of money"),
    2: ("poor", "disappointing", "weak", "not worth it", "below average"),
    3: ("okay", "average", "fine", "so-so", "neither good nor bad"),
    4: ("good", "nice", "enjoyable", "solid", "pleasant"),
    5: ("wonderful", "excellent", "amazing", "superb", "the best I have had"),
}
REVIEWS = ("The {item} was {word}.", "Honestly, this {item} is {word}.", "My verdict on the {item}: {word}.",
           "I found the {item} {word}.", "Everyone said the {item} would be {word}, and it was.")
TOPICS = {  # the 4th and 8th sentence of each topic are held out
    "sports": ("The striker scored twice in the final.", "Our team won the match in extra time.",
               "She ran the marathon in under three hours.", "The coach changed the lineup at half time.",
               "He hit a home run in the ninth inning.", "The tennis final went to five sets.",
               "The goalkeeper saved a penalty.", "They lost the race by a second."),
    "food": ("The soup needs more salt and pepper.", "Bake the bread until the crust is golden.",
             "This pasta sauce is made with fresh tomatoes.", "We ordered dumplings and fried rice.",
             "Slice the onions thinly before frying them.", "The cake was filled with cream and berries.",
             "The chef grilled the fish with lemon.", "Breakfast was eggs, toast and jam."),
    "weather": ("Heavy rain is expected tomorrow afternoon.", "It will be sunny and warm all weekend.",
                "A cold wind blew in from the north.", "Snow covered the roads overnight.",
                "The storm brought thunder and lightning.", "Fog will clear by the late morning.",
                "Temperatures will drop below freezing tonight.", "A heat wave is coming next week."),
    "computers": ("The laptop needs a new battery.", "Restart the router to fix the connection.",
                  "This program crashes when it opens large files.", "The new chip has eight cores.",
                  "Back up your files before updating the system.", "The keyboard stopped working after the update.",
                  "The server ran out of disk space.", "Install the driver for the printer."),
}
OPENERS = ("", "Today: ", "News: ", "I heard that ", "Apparently, ", "Note: ")


def _review(rng: random.Random, stars: int) -> str:
    return rng.choice(REVIEWS).format(item=rng.choice(ITEMS), word=rng.choice(RATED_WORDS[stars]))


# Each draws (text, label, whether it is held out): one review in 5 by a hash of its text; for topics,
# two sentences of each, so a held-out topic sentence is one the model never saw in any form.
def _sentiment(rng: random.Random) -> tuple[str, str, bool]:
    stars = rng.choice((1, 2, 4, 5))
    text = _review(rng, stars)
    return text, "positive" if stars > 3 else "negative", zlib.crc32(text.encode()) % 5 == 0


def _topic(rng: random.Random) -> tuple[str, str, bool]:
    topic = rng.choice(sorted(TOPICS))
    index = rng.randrange(len(TOPICS[topic]))
    sentence, opener = TOPICS[topic][index], rng.choice(OPENERS)
    return opener + (sentence[0].lower() + sentence[1:] if opener else sentence), topic, index % 4 == 3


def _rating(rng: random.Random) -> tuple[str, float, bool]:
    stars = rng.randint(1, 5)
    text = _review(rng, stars)
    return text, float(stars), zlib.crc32(text.encode()) % 5 == 0


LABELLED = {"builtin-sentiment": _sentiment, "builtin-topic": _topic, "builtin-rating": _rating}
LABELLED_SIZES = {"train": 800, "heldout": 200}


def builtin_labelled(name: str, split: str) -> list[dict]:
    """All {"text", "label"} rows of one split of a labelled built-in task, the same on every call. The
    tasks have fewer distinct sentences than rows: the splits share none (a hash decides), and a sentence
    may repeat within a split, as in real data."""
    if split not in LABELLED_SIZES:
        raise ValueError(f"the built-in task {name} has splits {sorted(LABELLED_SIZES)}, not {split!r}")
    rng = random.Random(f"bitfit-{name}-{split}")
    rows = []
    while len(rows) < LABELLED_SIZES[split]:
        text, label, held_out = LABELLED[name](rng)
        if held_out == (split == "heldout"):
            rows.append({"text": text, "label": label})
    return rows
