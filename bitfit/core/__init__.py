"""THE ALGORITHM: what a reader studies to learn BitFit. It imports nothing of bitfit outside this folder.

Read in this order:
    biases   the one predicate that decides what trains (the biases; a classifier's new head)
    flat     every trainable bias as a view into one fp32 buffer, its gradient into another
    loss     the token losses summed over the label tokens, and how many there are
    step     train_step: one optimizer step (forward, backward, sum over processes, normalize, clip, AdamW)
    errors   the exceptions that end a run with one line instead of a traceback
"""
