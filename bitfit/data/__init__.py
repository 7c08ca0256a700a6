"""Rows in, forward passes out.

    sources    rows from a file (.json, .jsonl, .csv, .parquet), a saved dataset, the hub or a built-in task
    examples   each row checked against one of three shapes, rendered and tokenized (-100 prompt labels)
    tasks      the built-in tasks: instruction problems with exact answers; sentences with a class or a number
    labelled   rows with a label (classification, regression) -> token ids and one label per row
    collate    examples -> one padded batch
    packing    a pass's examples end to end in one row, kept apart by their positions
    layout     a step's examples -> each process's share -> forward passes under a token budget
"""
