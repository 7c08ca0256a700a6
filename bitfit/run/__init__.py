"""A training run around the step: everything train.py does besides the step itself.

    config       TrainConfig: every flag of train.py, its default, its help and its checks
    run_folder   the run's folder: claimed, never someone else's, given back as found when a run fails early
    ranks        which process this is, and what the processes of a torchrun launch agree on (no-ops in one)
    interrupt    Ctrl-C / SIGTERM: finish the step, checkpoint and stop; or stop at once
    checkpoint   atomic checkpoints and exact resume
    loop         fit: the steps, and between them the report of each, held-out measures, checkpoints, stopping
    report       where each step's record goes (the console, metrics.jsonl, TensorBoard); beside the delta,
                 where the run ran, its best step and its loss curve
    evaluate     held-out loss and exact match; a classifier's and a regressor's measures
    measures     accuracy, F1, Matthews correlation, Pearson and Spearman
    finite       the one check that a tuned model's outputs are finite
"""
