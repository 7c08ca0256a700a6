import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from bitfit.data.collate import pad_batch, pad_id
from bitfit.data.examples import encode, token_fields
from bitfit.data.tasks import builtin_records
from tiny import tiny_tokenizer


@pytest.mark.parametrize("multiple_of", [None, 8])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_pad_batch_returns_exactly_what_DataCollatorForSeq2Seq_returns(padding_side, multiple_of):
    tokenizer = tiny_tokenizer(padding_side=padding_side)
    examples, _ = encode(builtin_records("train")[:5], tokenizer)
    assert len({len(e["input_ids"]) for e in examples}) > 1, "the batch must need padding"

    ours = pad_batch(examples, pad_id(tokenizer), padding_side, multiple_of)
    theirs = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=multiple_of)(
        [token_fields(e) for e in examples])
    assert set(ours) == set(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


def test_padding_uses_eos_when_the_tokenizer_has_no_pad_token():
    tokenizer = tiny_tokenizer(pad=False)
    assert tokenizer.pad_token_id is None
    batch = pad_batch([{"input_ids": [5], "attention_mask": [1], "labels": [5]},
                       {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [5, 6]}], pad_id(tokenizer))
    assert batch["input_ids"].tolist() == [[5, tokenizer.eos_token_id], [5, 6]]
    assert batch["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert batch["labels"].tolist() == [[5, -100], [5, 6]]
