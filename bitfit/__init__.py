"""bitfit: fine-tune only the bias terms of a pretrained transformer (Ben Zaken et al., ACL 2022).

Read the modules in this order; each holds one concept:
    tasks    the built-in task: instruction problems with exact answers, generated in code
    data     records from a file, folder or hub -> token ids with -100 prompt labels
    collate  a list of examples -> one padded batch
    biases   the one predicate that decides what trains; zero biases for bias-free models
    flat     every trainable bias as a view into one fp32 buffer, its gradient into another
    delta    the kilobyte file of `tuned - base` biases, and applying it to a base model
    errors   the one exception type for problems the user can fix
"""

__version__ = "0.1.0"
