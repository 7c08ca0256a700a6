"""What the benchmarks train: the embedded model as bitfit sets it up, and the two data sets.

    from workload import load_model, write_data
    model, tokenizer = load_model()                 # SmolLM2-135M-Instruct, zero biases added, all else frozen
    paths = write_data(folder)                      # {"builtin": .../builtin.jsonl, "alpaca": .../alpaca.jsonl}

The built-in task's examples are short (26.5 tokens). The Alpaca-length records are generated in code:
the lengths of alpaca-cleaned, without a download. The speed of a training step depends on how many
tokens its examples hold and how they spread, not on what the words mean. alpaca-cleaned examples (prompt + response) run from about 20 to a few hundred
tokens, most between 50 and 250, and the HF Trainer recipe cuts them at 256. Here each record's total length is
20 + a gamma(2, 65) draw, capped at 370: mean ~150 tokens, ~12% longer than 256 (so the cut at 256
happens, as in the HF Trainer recipe). An instruction of 6-24 words, an input on 40% of the records, and the
response takes the rest. Words are drawn from those the tokenizer keeps as ONE token, so a record's
token count is its word count plus the prompt template's few tokens.
"""

import json
import random
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitfit.core.biases import add_missing_biases, select_biases  # noqa: E402
from bitfit.data.sources import load_records  # noqa: E402
from bitfit.model import pretrained  # noqa: E402

WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not they which one "
    "you had but all were we when there can more if no out so said what up its about into than them only "
    "other new some could time these two may then do first any my now such like our over man me even most "
    "made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three place small water light number house word point city play"
).split()


def one_token_words(tokenizer) -> list[str]:
    """The words of WORDS that the tokenizer encodes, after a space, as exactly one token."""
    words = [w for w in WORDS if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    if len(words) < 50:
        raise ValueError(f"only {len(words)} of the benchmark's words are single tokens for this tokenizer")
    return words


def alpaca_like_records(tokenizer, n: int, seed: int = 0) -> list[dict]:
    """`n` Alpaca records (instruction, input, output) with alpaca-cleaned's spread of lengths."""
    rng = random.Random(f"alpaca-like-{seed}")
    words = one_token_words(tokenizer)

    def text(n_words: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n_words)).capitalize() + "."

    records = []
    for _ in range(n):
        total = min(370, 20 + round(rng.gammavariate(2.0, 65.0)))  # tokens of the whole example
        instruction = rng.randint(6, 24)
        given = rng.randint(5, 60) if rng.random() < 0.4 else 0
        response = max(3, total - 8 - instruction - given)  # ~8: the template, the periods and eos
        records.append({"instruction": text(instruction), "input": text(given) if given else "",
                        "output": text(response)})
    return records


def word_tokenizer():
    """A byte-level BPE tokenizer trained here on WORDS and the prompt template, for benchmarks that need
    no embedded model (benchmarks/gpu.py): every word of WORDS one token, an eos and a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [f"Human: {' '.join(WORDS)}.\n{word.capitalize()} {word}.\n\nAssistant: {word}." for word in WORDS] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")


def load_model() -> tuple:
    """The embedded SmolLM2-135M-Instruct as train.py sets it up: zero biases added, everything else frozen."""
    model, tokenizer = pretrained.load(pretrained.EMBEDDED, torch.device("cpu"))
    add_missing_biases(model)
    select_biases(model)
    return model, tokenizer


def write_data(folder: Path) -> dict[str, Path]:
    """The two data sets as Alpaca JSONL files in `folder`: the built-in train split, 1,000 Alpaca-length records."""
    tokenizer = AutoTokenizer.from_pretrained(pretrained.resolve(pretrained.EMBEDDED))
    sets = {"builtin": [{k: r[k] for k in ("instruction", "input", "output")} for r in load_records("builtin", "train")[0]],
            "alpaca": alpaca_like_records(tokenizer, 1000)}
    paths = {}
    for name, records in sets.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths
