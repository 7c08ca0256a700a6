"""Packed passes under the model's own SDPA (one masked square per row) vs bitfit's per-example attention.

    python benchmarks/packed_attention.py

On the embedded SmolLM2-135M with added biases: the forward and backward of packed passes of 8
built-in examples (one step of `python train.py`, packed), timed under each attention in
alternating rounds, so a change in the machine's load hits both. Also prints how far the losses of the
two attentions are apart: float rounding only, as tests/test_packing.py asserts on a tiny model.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workload import load_model  # noqa: E402  (the model as train.py sets it up)

from bitfit.core.loss import loss_sum  # noqa: E402
from bitfit.data.examples import encode  # noqa: E402
from bitfit.data.packing import pack_batch, use_per_example_attention  # noqa: E402
from bitfit.data.sources import load_records


def timed_passes(model, batches) -> tuple[float, torch.Tensor]:
    """(tokens/s, the passes' summed losses) for forward + backward of every batch."""
    start = time.perf_counter()
    losses = []
    for batch in batches:
        loss = loss_sum(model, batch)
        loss.backward()
        losses.append(loss.detach())
    tokens = sum(batch["input_ids"].numel() for batch in batches)
    return tokens / (time.perf_counter() - start), torch.stack(losses)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--passes", type=int, default=20, help="packed passes of 8 timed per round")
    cli.add_argument("--rounds", type=int, default=5, help="alternating rounds of the two attentions")
    args = cli.parse_args()

    model, tokenizer = load_model()
    records, _ = load_records("builtin", "train")
    examples, _ = encode(records, tokenizer)
    batches = [pack_batch(examples[start : start + 8]) for start in range(0, 8 * (args.passes + 2), 8)]
    warmup, batches = batches[:2], batches[2:]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.passes} packed passes of 8 "
          f"({sum(b['input_ids'].numel() for b in batches)} tokens) per round")

    sdpa = model.config._attn_implementation
    timed_passes(model, warmup)  # the first passes under each attention pay one-off costs: untimed
    use_per_example_attention(model)
    timed_passes(model, warmup)
    ratios = []
    for round_ in range(1, args.rounds + 1):
        model.set_attn_implementation(sdpa)
        masked, masked_losses = timed_passes(model, batches)
        assert use_per_example_attention(model)
        split, split_losses = timed_passes(model, batches)
        gap = float(((split_losses - masked_losses).abs() / masked_losses).max())
        ratios.append(split / masked)
        print(f"round {round_}: {sdpa} (masked square) {masked:.0f} tokens/s | per-example {split:.0f} tokens/s "
              f"| {split / masked:.3f}x | losses apart by up to {gap:.1e} (relative)")
    print(f"per-example attention / {sdpa}: median {statistics.median(ratios):.3f}x over {args.rounds} rounds")


if __name__ == "__main__":
    main()
