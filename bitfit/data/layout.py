"""The batch layout: which examples make an optimizer step, which process takes which of them, and how
each process cuts its share into forward passes. This module decides all of it, and says so in one line.

    a step      --batch-size x --grad-accum examples (8 by default), in a seeded order
    a process   under torchrun, each process takes an equal share of the step's EXAMPLES (counts differ
                by at most one, long and short ones dealt alike), so none idles while another works
    a pass      one forward and backward: a process cuts its share into passes of at most
                --max-pass-tokens tokens (an example longer than that gets a pass of its own); under
                --shard-weights every process runs as many passes as the busiest (idle ones if need be)

The layouts differ in how a pass holds its examples:
    packed      end to end in ONE row, no padding (bitfit.data.packing); the default wherever the model
                takes position ids and the packing check passes
    padded      one row each, padded to the pass's longest; longest first, so similar lengths share a
                pass; a pass's tokens are counted with their padding (rows x longest)
    trainer     micro-batches of --batch-size, padded, in the drawn order: exactly as the HF Trainer recipe

Whatever the layout, a step's loss is its summed token losses over its label tokens (bitfit.core.loss), so
every layout gives the same gradient up to float rounding: the layout decides speed and memory only.
"""

import math
import random
import statistics

KINDS = ("packed", "padded", "trainer")
Step = list[int]  # the indices of one optimizer step's examples
Passes = list[list[int]]  # one process's forward passes of one step, as example indices


MIB_PER_TOKEN = 16  # on CUDA, one token of a pass per this many MiB of the GPU's memory...
MAX_GPU_PASS_TOKENS = 8192  # ...up to this: beyond it, a pass is no faster per token


def default_pass_tokens(batch_size: int, max_len: int, gpu_memory: int | None = None) -> int:
    """--max-pass-tokens when not given. On the CPU (`gpu_memory` None): batch_size x max_len, the most one
    micro-batch of the HF Trainer recipe holds, so no pass needs more activation memory than its largest.
    On CUDA, a token per 16 MiB of the GPU's memory, rounded down to a power of two, between that and
    8192: 2048 on 40 GB, 4096 on 80 GB, 8192 from 128 GB. Activations grow about 1-5 MB per token for
    models of 1-7B parameters, so a pass takes a small part of the memory the weights leave."""
    cpu = batch_size * max_len
    if gpu_memory is None:
        return cpu
    tokens = 2 ** int(math.log2(max(1, gpu_memory // (MIB_PER_TOKEN * 2**20))))
    return max(cpu, min(tokens, MAX_GPU_PASS_TOKENS))


def draw_steps(n_examples: int, per_step: int, epochs: int, seed: int, max_steps: int = 0) -> list[Step]:
    """Each epoch: every example once, in a seeded shuffle, cut into steps of `per_step` (the last one of
    an epoch may be shorter); the first `max_steps` of them if that is not 0. A pure function of the
    seed, so a resumed run finds its place from the step number alone."""
    steps = []
    for epoch in range(epochs):
        if max_steps and len(steps) >= max_steps:  # --epochs 10000000 --max-steps 2 draws one epoch, not ten million
            break
        order = list(range(n_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        steps += [order[start : start + per_step] for start in range(0, n_examples, per_step)]
    return steps[: max_steps or None]


def deal(step: Step, lengths: list[int], world: int, rank: int) -> Step:
    """Process `rank`'s examples of a step, in the step's order.

    Dealt longest first like cards, in snake order (ranks 0, 1, ..., N-1, N-1, ..., 1, 0, 0, 1, ...):
    the counts differ by at most one, and no process gets all the long examples."""
    longest_first = sorted(range(len(step)), key=lambda i: -lengths[step[i]])  # stable: ties keep step order
    mine = [i for turn, i in enumerate(longest_first) if _dealt_to(turn, world) == rank]
    return [step[i] for i in sorted(mine)]


def _dealt_to(turn: int, world: int) -> int:
    lap, seat = divmod(turn, world)
    return seat if lap % 2 == 0 else world - 1 - seat


def pass_tokens(kind: str, lengths: list[int]) -> int:
    """Tokens a pass of examples of these lengths computes on: all of them packed, rows x longest padded."""
    return sum(lengths) if kind == "packed" else len(lengths) * max(lengths)


def cut(examples: Step, lengths: list[int], kind: str, max_tokens: int, batch_size: int) -> Passes:
    """One process's share of a step cut into passes.

    trainer: micro-batches of `batch_size` in order. packed and padded: longest first, each example into
    the first pass it fits in without taking it past `max_tokens` (first-fit decreasing: few passes,
    similar lengths together); an example that fits nowhere opens a pass, alone if it is over budget."""
    if kind == "trainer":
        return [examples[start : start + batch_size] for start in range(0, len(examples), batch_size)]
    passes: Passes = []
    for i in sorted(examples, key=lambda i: -lengths[i]):
        fits = (p for p in passes if pass_tokens(kind, [lengths[j] for j in p + [i]]) <= max_tokens)
        target = next(fits, None)
        if target is None:
            passes.append([i])
        else:
            target.append(i)
    return passes


def plan(steps: list[Step], lengths: list[int], kind: str, max_tokens: int, batch_size: int,
         world: int = 1, rank: int = 0, lockstep: bool = False) -> list[Passes]:
    """Process `rank`'s passes for every step: its share of the step's examples, cut by the layout.

    `lockstep` (sharded weights, where every forward is a collective): every process runs as many
    passes as the busiest one; a process with fewer gets idle passes, empty lists here (train.py's loop makes
    each bitfit.data.collate.idle_pass: one token with no label, which adds nothing to the loss or gradient)."""
    if kind not in KINDS:
        raise ValueError(f"layout must be one of {KINDS}, not {kind!r}")
    mine = [cut(deal(step, lengths, world, rank), lengths, kind, max_tokens, batch_size) for step in steps]
    if not lockstep or world == 1:
        return mine
    busiest = [max(len(cut(deal(step, lengths, world, r), lengths, kind, max_tokens, batch_size)) for r in range(world))
               for step in steps]
    return [passes + [[] for _ in range(most - len(passes))] for passes, most in zip(mine, busiest)]


def describe(steps: list[Step], lengths: list[int], kind: str, max_tokens: int, batch_size: int, world: int,
             lockstep: bool = False) -> str:
    """The layout as it really is, for the log, e.g.
    'layout: packed | a step = 8 examples, ~215 tokens, passes of <= 128 tokens, 2 per process'."""
    plans = [plan(steps, lengths, kind, max_tokens, batch_size, world, rank, lockstep) for rank in range(world)]
    per_step = max(len(step) for step in steps)
    tokens = statistics.mean(sum(lengths[i] for i in step) for step in steps)
    counts = sorted({len(passes) for rank_plan in plans for passes in rank_plan})
    n_passes = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    shape = (f"micro-batches of {batch_size}" if kind == "trainer" else f"passes of <= {max_tokens:,} tokens")
    line = (f"layout: {kind} | a step = {per_step} examples, ~{tokens:,.0f} tokens, {shape}, "
            f"{n_passes} per {'process' if world > 1 else 'step'}")
    if world > 1:
        sizes = sorted({len(deal(steps[0], lengths, world, rank)) for rank in range(world)})
        line += f" | {world} processes, {'-'.join(map(str, sizes))} examples each"
        if per_step < world:
            line += f" ({world - per_step} idle: raise --grad-accum to at least {world})"
    if idle := sum(not passes for rank_plan in plans for step in rank_plan for passes in step):
        line += f" | in lockstep: {idle:,} idle one-token pass{'es' if idle > 1 else ''} over the run"
    return line
