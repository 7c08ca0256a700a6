"""What the speed benchmarks (trainer_vs_bitfit.py on the CPU, gpu.py on a GPU) run and measure alike.

    recipe_side(model_dir, jsonl, steps, lr)           the HF Trainer recipe, 1 x 8
    bitfit_side(model_dir, jsonl, steps, lr, extra)    train.run() with train.py's defaults (plus `extra`)
    matmul_peak(...), floor_flops(...)                  the BitFit-MFU: the least work, over the device's peak
    optimizer_steps(device)                             one AdamW step over bloomz-1b1's biases, four ways

Both sides train the same examples in the same order (bitfit's, for the Trainer that reads sequentially),
for the same steps, with the same AdamW, lr and linear schedule, and report the same measures: seconds,
per-step losses, tokens and label tokens, peak RSS, and on CUDA max allocated and reserved memory.
"""

import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BloomConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitfit.core.biases import add_missing_biases  # noqa: E402
from bitfit.data.examples import encode, token_fields  # noqa: E402
from bitfit.data.layout import draw_steps  # noqa: E402
from bitfit.data.sources import load_records
from bitfit.run.report import peak_memory_gb  # noqa: E402  (this process's own peak RSS on the CPU)

SEED, ACCUM = 0, 8
BLOOMZ_1B1 = dict(vocab_size=250880, hidden_size=1536, n_layer=24, n_head=16)  # bigscience/bloomz-1b1's config.json


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ordered_rows(jsonl: str, tokenizer, steps: int) -> list[dict]:
    """The token fields of bitfit's first `steps` steps' examples, in its order: the Trainer reads them
    sequentially, so both sides see the same 8 examples in each optimizer step."""
    records, places = load_records(jsonl)
    examples, _ = encode(records, tokenizer, places=places)
    return [token_fields(examples[i]) for step in draw_steps(len(examples), ACCUM, 1, SEED, steps) for i in step]


def token_counts(rows: list[dict]) -> dict:
    return {"tokens": sum(len(r["input_ids"]) for r in rows),
            "label_tokens": sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)}


def step_tokens(rows: list[dict]) -> list[int]:
    """The tokens of each optimizer step (ACCUM rows each)."""
    return [sum(len(r["input_ids"]) for r in rows[i : i + ACCUM]) for i in range(0, len(rows), ACCUM)]


def synchronized_time() -> float:
    """The wall clock once the device's queued work is done."""
    if device().type == "cuda":
        torch.cuda.synchronize()
    return time.time()


def memory() -> dict:
    """This process's peak RSS; on CUDA also torch's max allocated and max reserved memory."""
    cuda = device().type == "cuda"
    return {"peak_rss_gb": peak_memory_gb(torch.device("cpu")),
            "max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "max_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}


def timed(run) -> float:
    """Seconds `run()` takes, the device's queued work included."""
    if device().type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device().type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_seconds(ends: list[float]) -> list[float]:
    """The wall time of steps 2, 3, ...: from the end of the step before to its own end (collation,
    logging and all). Step 1 has no step before it, and is a warm-up anyway."""
    return [end - start for start, end in zip(ends, ends[1:])]


def recipe_side(model_dir: str, jsonl: str, steps: int, lr: float) -> dict:
    """The HF Trainer recipe: from_pretrained, the recipe's freezing ("bias" in name), Trainer +
    DataCollatorForSeq2Seq, batch 1 x accumulation 8 (seed 001); bf16 autocast on a GPU, as they ran it."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    class StepEnds(TrainerCallback):
        """When each optimizer step ends, the device's work done: the recipe's steps timed without its setup."""
        def __init__(self):
            self.ends = []

        def on_step_end(self, *args, **kwargs):
            self.ends.append(synchronized_time())

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, low_cpu_mem_usage=True)  # as seed 001 loads it
    add_missing_biases(model)  # SmolLM2 has no biases: the same zero biases bitfit adds (BLOOM has its own)
    for name, param in model.named_parameters():
        param.requires_grad = "bias" in name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = ordered_rows(jsonl, tokenizer, steps)
    cuda = device().type == "cuda"
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=ACCUM,
                                 learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                                 adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                                 max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], bf16=cuda,
                                 use_cpu=not cuda, train_sampling_strategy="sequential", dataloader_num_workers=0,
                                 seed=SEED, disable_tqdm=True)
        clock = StepEnds()
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), callbacks=[clock])
        seconds = timed(trainer.train)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"seconds": seconds, "losses": losses, "trainable": trainable, "step_seconds": step_seconds(clock.ends),
            "step_tokens": step_tokens(rows), **token_counts(rows), **memory()}


def bitfit_side(model_dir: str, jsonl: str, steps: int, lr: float, extra: list[str]) -> dict:
    """`python train.py` with its default flags (plus `extra`), run in this process on the same data,
    steps and lr."""
    import train
    from bitfit.run.config import from_args

    with tempfile.TemporaryDirectory() as out:
        cfg = from_args(["--model", model_dir, "--data", jsonl, "--eval-data", "none", "--lr", str(lr), "--max-steps",
                         str(steps), "--seed", str(SEED), "--out-dir", out, "--log-every", str(10**6), *extra])
        results = train.run(cfg)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = ordered_rows(jsonl, AutoTokenizer.from_pretrained(model_dir), steps)
    # A step's record is made when its host read returns, the device's work done: its `time` is the step's end.
    ends = [datetime.fromisoformat(r["time"]).timestamp() for r in records]
    return {"seconds": results["train_seconds"], "losses": [r["loss"] for r in records], "trainable": results["trainable"],
            "layout": results["layout"], "max_pass_tokens": cfg.max_pass_tokens, "step_seconds": step_seconds(ends),
            "step_tokens": step_tokens(rows), **token_counts(rows), **memory()}


def matmul_peak(size: int, dtype: torch.dtype, repeats: int, trials: int = 5) -> float:
    """This device's matmul FLOP/s at `dtype`, the best of `trials`: the denominator of BitFit-MFU."""
    a, b = (torch.randn(size, size, device=device(), dtype=dtype) for _ in range(2))
    a @ b  # warm up
    return max(2 * size**3 * repeats / timed(lambda: [a @ b for _ in range(repeats)]) for _ in range(trials))


def floor_flops(model_dir: str, tokens: int, label_tokens: int) -> float:
    """The least matmul work of BitFit on these tokens: 4 x the blocks' matmul parameters per token
    (forward 2, backward to the activations 2; frozen weights need no weight gradient), and the LM head
    at label positions only. Attention scores are left out."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    blocks = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embeddings and p is not head)
    return 4 * (blocks * tokens + head.numel() * label_tokens)


def optimizer_steps(repeats: int = 200) -> dict:
    """Seconds per AdamW step over bloomz-1b1's 146 bias tensors (408,576 values) on this device: the
    flat buffer (fused, foreach) against the separate tensors (foreach, fused)."""
    with torch.device("meta"):
        shapes = [p.shape for n, p in AutoModelForCausalLM.from_config(BloomConfig(**BLOOMZ_1B1)).named_parameters()
                  if n.endswith(".bias")]
    tensors = [torch.nn.Parameter(torch.randn(shape, device=device())) for shape in shapes]
    for t in tensors:
        t.grad = torch.randn_like(t)
    flat = torch.nn.Parameter(torch.cat([t.detach().reshape(-1) for t in tensors]))
    flat.grad = torch.randn_like(flat)
    n = len(tensors)
    timings = {}
    for name, params, kwargs in (("flat buffer, fused AdamW", [flat], {"fused": True}),
                                 ("flat buffer, foreach AdamW", [flat], {"foreach": True}),
                                 (f"{n} tensors, foreach AdamW", tensors, {"foreach": True}),
                                 (f"{n} tensors, fused AdamW", tensors, {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-3, **kwargs)
        for _ in range(10):
            optimizer.step()
        timings[name] = timed(lambda: [optimizer.step() for _ in range(repeats)]) / repeats  # noqa: B023
    return {"tensors": n, "values": flat.numel(), "seconds_per_step": timings}
