"""After training: what a delta becomes. Nothing in training imports these.

    merge        python -m bitfit.export.merge: a delta folded into a standard Hugging Face model folder
    adapter      python -m bitfit.export.adapter: a delta as a PEFT BEFT adapter folder
    inspection   python -m bitfit.export.inspection: where the biases moved, per layer and bias type
"""
