"""A training run around the step: the plumbing train.py calls, one line each.

    config       TrainConfig: every flag of train.py, its default, its help and its checks
    start        how a run starts: its folder opened (new, --overwrite, --resume), a checkpoint restored
    inputs       the run's data: rows read and checked, examples, each process's passes, the held-out set
    evaluate     held-out loss and exact match, a classifier's and a regressor's measures; before, during
                 and after training
    report       where each step's record goes (the console, metrics.jsonl, TensorBoard); beside the delta,
                 where the run ran, its best step, its plots and results.json
    run_folder   the run's folder: claimed, never someone else's, given back as found when a run fails early
    checkpoint   atomic checkpoints of whatever the optimizer holds
    interrupt    Ctrl-C / SIGTERM: finish the step, checkpoint and stop; or stop at once
    ranks        which process this is, and what the processes of a torchrun launch agree on (no-ops in one)
    measures     accuracy, F1, Matthews correlation, Pearson and Spearman
    finite       the one check that a tuned model's outputs are finite
"""
