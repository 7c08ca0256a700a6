"""A training step makes the host wait for the device once, at its end: what the host needs to know about
a pass (its label tokens and tokens, the positions the loss reads, a packed row's sequence lengths) is
counted on the host before the step (bitfit.core.loss.counted), and the step reads its totals, its norm
and whether it was finite in ONE read.

On a GPU the host waits whenever it reads what the device computed: `.item()`, `.tolist()`, `bool()`,
`nonzero` (its size is data), a comparison in an `if`. The CPU has no device to wait for, so these tests
count those operations instead, leaving out the ones on the pass's own host tensors.

THE BUDGET, per step: 1 read, plus those of transformers' attention-mask builder, once per forward pass
(never per layer): 1 for a packed row (is it packed?), up to 2 for a padded batch (is there padding? is
it all at the end?). BLOOM builds its own mask and asks nothing.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bitfit.core.step
from bitfit.core.biases import add_missing_biases, select_biases
from bitfit.core.errors import NonFiniteError
from bitfit.core.flat import FlatBiases
from bitfit.core.loss import counted
from bitfit.core.step import make_optimizer, train_step
from bitfit.data.collate import pad_batch, pad_id
from bitfit.data.examples import encode
from bitfit.data.packing import pack_batch, use_packed_alibi, use_per_example_attention
from tiny import tiny_bloom, tiny_llama, tiny_tokenizer

WAITS = {"aten.nonzero.default", "aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.equal.default"}


class DeviceReads(TorchDispatchMode):
    """Counts the operations that make a host wait for a GPU, but those on `host` tensors (and `.tolist()`,
    which reads memory without an operation)."""

    def __init__(self, host: list[torch.Tensor]):
        super().__init__()
        self.host, self.count = {id(tensor) for tensor in host}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in WAITS and not any(id(arg) in self.host for arg in args):
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self.tolist = torch.Tensor.tolist
        mode = self

        def counted_tolist(tensor):
            mode.count += id(tensor) not in mode.host
            return mode.tolist(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.tolist
        return super().__exit__(*exc)


def setup(make_model, blocks: int = 2):
    model = make_model(blocks=blocks)
    add_missing_biases(model)
    flat = FlatBiases(model, select_biases(model))
    tokenizer = tiny_tokenizer()
    rows = [{"instruction": "Add these two numbers.", "input": f"{a} {b}", "output": str(a + b)}
            for a, b in zip(range(8), range(3, 11))]
    examples, _ = encode(rows, tokenizer)
    return model, flat, make_optimizer(flat.param, 1e-3, (0.9, 0.999), 1e-8, 0.0), examples, pad_id(tokenizer)


def reads_in_one_step(make_model, layout: str, blocks: int = 2) -> tuple[int, int]:
    """(device reads in the second step, passes): the first step also makes AdamW's state."""
    model, flat, optimizer, examples, pad = setup(make_model, blocks)
    if layout == "packed":
        assert use_per_example_attention(model) if make_model is tiny_llama else use_packed_alibi(model)
        passes = [counted(pack_batch(examples[i : i + 4])) for i in (0, 4)]
    else:
        passes = [counted(pad_batch(examples[i : i + 4], pad)) for i in (0, 4)]
    train_step(model, flat, optimizer, passes, 1.0, False)
    host = [tensor for batch in passes for tensor in batch.values()]
    with DeviceReads(host) as reads:
        train_step(model, flat, optimizer, passes, 1.0, False)
    return reads.count, len(passes)


@pytest.mark.parametrize(("make_model", "layout", "mask_reads"), [
    (tiny_llama, "packed", 1), (tiny_llama, "padded", 2), (tiny_bloom, "packed", 0), (tiny_bloom, "padded", 0)])
def test_a_step_reads_from_the_device_once_plus_where_transformers_builds_a_mask(make_model, layout, mask_reads):
    reads, passes = reads_in_one_step(make_model, layout)
    assert 1 <= reads <= 1 + mask_reads * passes


@pytest.mark.parametrize(("make_model", "layout"), [(tiny_llama, "packed"), (tiny_bloom, "packed"), (tiny_bloom, "padded")])
def test_a_deeper_model_makes_a_step_read_no_more_often(make_model, layout):
    assert reads_in_one_step(make_model, layout, blocks=4) == reads_in_one_step(make_model, layout, blocks=2)


def test_a_step_with_a_nan_loss_leaves_the_biases_and_adamw_state_as_they_were(monkeypatch):
    model, flat, optimizer, examples, pad = setup(tiny_llama)
    passes = [counted(pad_batch(examples[:4], pad))]
    train_step(model, flat, optimizer, passes, 1.0, False)
    values, state = flat.values.clone(), {key: value.clone() for key, value in optimizer.state[flat.param].items()}
    real = bitfit.core.step.loss_sum
    monkeypatch.setattr(bitfit.core.step, "loss_sum", lambda model, batch: real(model, batch) * float("nan"))
    with pytest.raises(NonFiniteError, match="loss nan"):
        train_step(model, flat, optimizer, passes, 1.0, False)
    assert torch.equal(flat.values, values)
    for key, value in optimizer.state[flat.param].items():
        assert torch.equal(value, state[key]), key
