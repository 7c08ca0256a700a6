"""bitfit: fine-tune only the bias terms of a pretrained transformer (Ben Zaken et al., ACL 2022).

The folders draw the architecture (each has its own map in its __init__.py):
    core/       THE ALGORITHM: what trains, the flat buffer, the loss, the step. Start here.
    data/       rows in (files, hub, built-in tasks), token ids and forward passes out
    model/      the base model, and the delta file of its tuned biases
    run/        the plumbing of a run that train.py calls: config, start and resume, data, evaluation, reports
    parallel/   torchrun and FSDP2 sharding, loaded only when used
    export/     after training, what a delta becomes: a merged model, a PEFT adapter, a map of what moved
    infer/      using deltas: many in one batch, each row its own; the classify command
    cli, files, hub    the conventions every command shares: one-line errors, safe writes, hub access
train.py and generate.py, at the top of the repository, are the two commands.
"""

__version__ = "0.1.0"

# First, before torch and transformers load: Ctrl-C while a command starts is one line, not a traceback.
from bitfit.run.interrupt import quiet_while_starting  # noqa: E402

quiet_while_starting()

# What a loop of your own needs (README: "Your own loop"); each has its docstring.
from bitfit.core.biases import add_missing_biases, select_biases  # noqa: E402  (after __version__, which modules import)
from bitfit.core.flat import FlatBiases  # noqa: E402
from bitfit.core.loss import label_tokens, loss_sum  # noqa: E402
from bitfit.data.collate import pad_batch, pad_id  # noqa: E402
from bitfit.data.examples import encode  # noqa: E402
from bitfit.model.delta import apply_delta, read_delta, save_delta  # noqa: E402
from bitfit.model.pretrained import load  # noqa: E402

__all__ = ["FlatBiases", "add_missing_biases", "apply_delta", "encode", "label_tokens", "load", "loss_sum", "pad_batch",
           "pad_id", "read_delta", "save_delta", "select_biases"]
