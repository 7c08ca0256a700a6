"""A training run around the step: what train.py calls, in the order it calls it.

    config       TrainConfig: every flag of train.py, its default, its help and its checks
    run_folder   the run's folder: claimed, never someone else's, given back as found when a run fails early
    ranks        which process this is, and what the processes of a torchrun launch agree on (no-ops in one)
    loop         fit: the steps, and between them logging, held-out evaluation, checkpoints and stopping
    report       where each step's record goes (console, metrics.jsonl, loss.png, TensorBoard); results.json
    evaluate     held-out loss and exact match; a classifier's and a regressor's measures
    metrics      accuracy, F1, Matthews correlation, Pearson and Spearman
    finite       the one check that a tuned model's outputs are finite
    checkpoint   atomic checkpoints and exact resume
    interrupt    Ctrl-C / SIGTERM: finish the step, checkpoint and stop; or stop at once
"""
