"""bitfit: fine-tune only the bias terms of a pretrained transformer (Ben Zaken et al., ACL 2022).

Read the modules in this order; each holds one concept:
    tasks        the built-in task: instruction problems with exact answers, generated in code
    data         rows (Alpaca, chat, prompt/completion) from a file, folder or hub -> token ids with -100 prompt labels
    collate      a list of examples -> one padded batch
    loss         the token losses summed over the label tokens, and how many there are
    packing      a pass's examples end to end in one row, kept apart, and the check that they are
    layout       a step's examples -> each process's share -> forward passes under a token budget
    biases       the one predicate that decides what trains; zero biases for bias-free models
    flat         every trainable bias as a view into one fp32 buffer, its gradient into another
    delta        the kilobyte file of `tuned - base` biases, and applying it to a base model
    files        writing a file so that a crash or a full disk never leaves half of it
    models       loading a base: hub, folder, or the embedded GGUF dequantized once
    hub          is the Hugging Face hub reachable? asked in seconds; offline mode when not
    config       TrainConfig: every flag of train.py, its default and its help
    loop         train_step, the one BitFit step; fit, the loop around it; the lr schedule
    evaluate     held-out loss and greedy exact match
    checkpoint   atomic checkpoints and exact resume
    interrupt    Ctrl-C / SIGTERM: finish the step, checkpoint and stop; or stop at once
    distributed  torchrun data parallelism: who does what, and the all-reduces
    merge        a delta folded into a standard Hugging Face model folder
    errors       the exceptions that end a run with one line instead of a traceback
    cli          argparse errors as one line, and the --device check the entry points share
"""

__version__ = "0.1.0"
