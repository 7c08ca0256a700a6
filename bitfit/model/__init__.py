"""The base model and the file that changes it.

    pretrained   loading a base (a causal LM or a classifier) from the hub, a folder or an embedded wheel
    delta        the kilobyte file of `tuned - base` biases (and a classifier's head): save, read, check, apply;
                 a PEFT BEFT adapter folder read as one
"""
