"""bitfit: fine-tune only the bias terms of a pretrained transformer (Ben Zaken et al., ACL 2022).

Read the modules in this order; each holds one concept:
    tasks        the built-in tasks: instruction problems with exact answers; sentences with a class or a number
    data         rows (Alpaca, chat, prompt/completion) from a file, folder or hub -> token ids with -100 prompt labels
    labelled     rows with a label (a text or a pair; a class or a number) -> token ids and one label per row
    collate      a list of examples -> one padded batch
    loss         the token losses summed over the label tokens (a classifier's: the rows'), and how many there are
    packing      a pass's examples end to end in one row, kept apart, and the check that they are
    layout       a step's examples -> each process's share -> forward passes under a token budget
    biases       the one predicate that decides what trains (biases, a new head); zero biases for bias-free models
    flat         every trainable bias as a view into one fp32 buffer, its gradient into another
    delta        the kilobyte file of `tuned - base` biases (and a classifier's head), and applying it to a base
    files        writing a file so that a crash or a full disk never leaves half of it; reading JSON back safely
    models       loading a base (a causal LM or a classifier): hub, folder, or an embedded one
    hub          is the Hugging Face hub reachable? asked in seconds; offline mode when not
    config       TrainConfig: every flag of train.py, its default and its help
    loop         train_step, the one BitFit step; fit, the loop around it; the lr schedule
    evaluate     held-out loss and greedy exact match; a classifier's and regressor's measures
    metrics      accuracy, F1, Matthews correlation, Pearson and Spearman
    finite       the one check that a tuned model's outputs are finite
    checkpoint   atomic checkpoints and exact resume
    interrupt    Ctrl-C / SIGTERM: finish the step, checkpoint and stop; or stop at once
    distributed  torchrun data parallelism: who does what, and the all-reduces
    merge        a delta folded into a standard Hugging Face model folder
    errors       the exceptions that end a run with one line instead of a traceback
    cli          argparse errors as one line, and the --device check the entry points share
    report       where a run ran, its best step, its loss curve
    inspect      python -m bitfit.inspect: where the biases moved, per layer and bias type
    adapter      a delta as a PEFT BEFT adapter folder, and back
    mixed        many deltas in one batch: each row adds its own (a classifier's: and runs its own head)
    classify     python -m bitfit.classify: each text's label and probability from one or more deltas
"""

__version__ = "0.1.0"

# What a loop of your own needs (README: "Your own loop"); each has its docstring.
from .biases import add_missing_biases, select_biases  # noqa: E402  (after __version__, which modules import)
from .collate import pad_batch, pad_id  # noqa: E402
from .data import encode  # noqa: E402
from .delta import apply_delta, read_delta, save_delta  # noqa: E402
from .flat import FlatBiases  # noqa: E402
from .loss import label_tokens, loss_sum  # noqa: E402
from .models import load  # noqa: E402

__all__ = ["FlatBiases", "add_missing_biases", "apply_delta", "encode", "label_tokens", "load", "loss_sum", "pad_batch",
           "pad_id", "read_delta", "save_delta", "select_biases"]
