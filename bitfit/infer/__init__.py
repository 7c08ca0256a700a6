"""Using trained deltas on a base: many at once, each row its own.

    mixed      many deltas in one batch: each row adds its own (a classifier's: and runs its own head)
    classify   python -m bitfit.infer.classify: each text's label and probability from one or more deltas
generate.py, at the top of the repository, is the language models' counterpart of classify.
"""
