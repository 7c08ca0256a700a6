"""After training: the tools that take a delta somewhere else. Nothing in training imports them.

    merge        python -m bitfit.export.merge: a delta folded into a standard Hugging Face model folder
    adapter      python -m bitfit.export.adapter: a delta as a PEFT BEFT adapter folder
    inspection   python -m bitfit.export.inspection: where the biases moved, per layer and bias type
    mixed        many deltas in one batch: each row adds its own (a classifier's: and runs its own head)
    classify     python -m bitfit.export.classify: each text's label and probability from one or more deltas
"""
