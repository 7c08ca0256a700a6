"""The sweep behind train.py's ONE default learning rate: held-out exact match per lr, on three tasks.

    python benchmarks/lr_sweep.py                        # 5 lrs x 3 tasks, the embedded model: ~35 min on 2 CPU cores
    python benchmarks/lr_sweep.py --lrs 1e-3 5e-3 --tasks dates

Every run is `python train.py` with its DEFAULT flags except --lr, --data and --eval-data, in a process of
its own, as a user runs it. The tasks:
    builtin     the built-in task (sort, add, reverse, count): 800 training examples, 100 held out
    dates       "March 5, 2021" -> "2021-03-05": 200 training examples, 100 held out
    sequences   "4 9 14 19" -> "24" (next term of an arithmetic sequence): 200 training examples, 100 held out
The two generated here are NOT the built-in task, and 200 rows is a first task of a user's own. The
table gives, per task and lr, the held-out exact match after training (the base model's before it in
the header) and the held-out loss; the last column ranks the lrs by their mean exact match.
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _date(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return f"{MONTHS[month - 1]} {day}, {year}", f"{year:04d}-{month:02d}-{day:02d}"


def _sequence(rng: random.Random) -> tuple[str, str]:
    start, step = rng.randint(1, 60), rng.randint(2, 13)
    terms = [start + step * i for i in range(5)]
    return " ".join(map(str, terms[:4])), str(terms[4])


GENERATED = {
    "dates": ("Write this date in the format YYYY-MM-DD.", _date),
    "sequences": ("Give the next number of this sequence.", _sequence),
}


def generated_task(name: str, folder: Path, train: int = 200, heldout: int = 100) -> tuple[Path, Path]:
    """Two JSONL files of Alpaca rows, train and held-out, that share no question."""
    instruction, draw = GENERATED[name]
    rng, seen, rows = random.Random(f"lr-sweep-{name}"), set(), []
    while len(rows) < train + heldout:
        question, answer = draw(rng)
        if question not in seen:
            seen.add(question)
            rows.append({"instruction": instruction, "input": question, "output": answer})
    paths = folder / f"{name}-train.jsonl", folder / f"{name}-heldout.jsonl"
    for path, part in zip(paths, (rows[:train], rows[train:])):
        path.write_text("".join(json.dumps(row) + "\n" for row in part))
    return paths


def train_once(task: str, lr: float, folder: Path) -> dict:
    """One default `python train.py` run at this lr; its results.json."""
    data = ["--data", "builtin"] if task == "builtin" else \
        ["--data", str(folder / f"{task}-train.jsonl"), "--eval-data", str(folder / f"{task}-heldout.jsonl")]
    out = folder / f"{task}-lr{lr:g}"
    done = subprocess.run([sys.executable, "train.py", *data, "--lr", str(lr), "--out-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{task} at lr {lr:g} failed:\n{done.stderr[-2000:]}")
    return json.loads((out / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 5e-3, 1e-2, 2e-2])
    parser.add_argument("--tasks", nargs="+", default=["builtin", *GENERATED], choices=["builtin", *GENERATED])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bitfit-lr-sweep-") as tmp:
        folder = Path(tmp)
        for task in args.tasks:
            if task in GENERATED:
                generated_task(task, folder)
        results = {}
        for task in args.tasks:
            for lr in args.lrs:
                results[task, lr] = train_once(task, lr, folder)
                after = results[task, lr]["after"]
                print(f"{task:<10} lr {lr:<7g} exact match {100 * after['exact_match']:5.1f}%  "
                      f"held-out loss {after['loss']:.4f}  ({results[task, lr]['train_seconds']:.0f} s training)",
                      flush=True)

    before = {task: 100 * results[task, args.lrs[0]]["before"]["exact_match"] for task in args.tasks}
    print("\nheld-out exact match after training, % (held-out loss); the untrained model's in the header")
    header = " | ".join(f"{task} (base {before[task]:.0f}%)" for task in args.tasks)
    print(f"| lr | {header} | mean exact match |")
    print("|---" * (len(args.tasks) + 2) + "|")
    for lr in args.lrs:
        cells = [f"{100 * results[task, lr]['after']['exact_match']:.0f}% ({results[task, lr]['after']['loss']:.3f})"
                 for task in args.tasks]
        mean = sum(100 * results[task, lr]["after"]["exact_match"] for task in args.tasks) / len(args.tasks)
        print(f"| {lr:g} | {' | '.join(cells)} | {mean:.1f}% |")


if __name__ == "__main__":
    main()
