import pytest
import torch

from bitfit.core.biases import add_missing_biases, select_biases
from bitfit.core.flat import FlatBiases
from bitfit.data.collate import pad_batch
from bitfit.data.examples import encode
from bitfit.data.tasks import builtin_records
from tiny import tiny_bloom, tiny_llama, tiny_tokenizer


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    """n micro-batches of 2 examples of the built-in task."""
    tokenizer = tiny_tokenizer()
    examples, _ = encode(builtin_records("train")[: 2 * n], tokenizer)
    return [pad_batch(examples[i : i + 2], tokenizer.pad_token_id) for i in range(0, 2 * n, 2)]


def flattened(make_model=tiny_bloom, which: str = "all"):
    model = make_model()
    add_missing_biases(model)
    return model, FlatBiases(model, select_biases(model, which))


def lies_in(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    start = buffer.data_ptr()
    end = start + buffer.numel() * buffer.element_size()
    return start <= tensor.data_ptr() and tensor.data_ptr() + tensor.numel() * tensor.element_size() <= end


@pytest.mark.parametrize("make_model", [tiny_bloom, tiny_llama])
def test_every_bias_is_a_view_into_one_flat_fp32_buffer(make_model):
    model, flat = flattened(make_model)
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    assert flat.values.dtype == torch.float32
    assert flat.values.numel() == sum(p.numel() for p in biases)
    assert all(lies_in(p, flat.values) and lies_in(p.grad, flat.grads) for p in biases)
    flat.values.fill_(0.5)  # writing the buffer writes the model's biases
    assert all(bool((p == 0.5).all()) for p in biases)


def test_flattening_keeps_every_bias_value():
    reference = tiny_bloom()
    model, flat = flattened()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(flat.values, flat.base)


def test_backward_accumulates_every_bias_gradient_in_place_in_the_flat_gradient_buffer():
    model, flat = flattened()
    reference = tiny_bloom()
    values_ptr, grads_ptr = flat.values.data_ptr(), flat.grads.data_ptr()
    for batch in batches(3):
        model(**batch).loss.backward()
        reference(**batch).loss.backward()

    flat.check()  # every .grad is still the view it was
    assert (flat.values.data_ptr(), flat.grads.data_ptr()) == (values_ptr, grads_ptr)  # the buffers never moved
    expected = torch.cat([reference.get_parameter(name).grad.reshape(-1) for name in flat.names])
    torch.testing.assert_close(flat.grads, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(flat.param.grad, flat.grads)


def test_the_optimizer_holds_exactly_one_tensor():
    model, flat = flattened()
    optimizer = torch.optim.AdamW([flat.param], lr=1e-3)
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == 1 and held[0] is flat.param
    assert flat.param.data_ptr() == flat.values.data_ptr()


@pytest.mark.parametrize("make_model", [tiny_bloom, tiny_llama])
def test_adamw_on_the_flat_buffer_gives_the_biases_of_per_tensor_adamw(make_model):
    model, flat = flattened(make_model)
    reference = make_model()
    add_missing_biases(reference)
    reference_biases = [reference.get_parameter(name) for name in select_biases(reference)]
    optimizers = [torch.optim.AdamW([flat.param], lr=1e-2, weight_decay=0.0),
                  torch.optim.AdamW(reference_biases, lr=1e-2, weight_decay=0.0, foreach=False)]

    for step in range(4):
        for batch in batches(2):  # two micro-batches a step: accumulation too
            model(**batch).loss.backward()
            reference(**batch).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        flat.zero_grad()
        reference.zero_grad()

    flat.check()
    assert not torch.equal(flat.values, flat.base)  # it trained
    for name, param in zip(flat.names, reference_biases):
        torch.testing.assert_close(model.get_parameter(name), param, rtol=0, atol=1e-6, msg=name)
    weights = [(n, p) for n, p in model.named_parameters() if not n.endswith(".bias")]
    assert all(torch.equal(p, make_model().get_parameter(n)) for n, p in weights)  # weights never move


def test_masked_entries_get_a_zero_gradient_and_never_move():
    model, flat = flattened(which="reduced")
    assert flat.mask is not None and flat.num_trainable < flat.values.numel()
    optimizer = torch.optim.AdamW([flat.param], lr=1e-2, weight_decay=0.0)
    for batch in batches(3):
        model(**batch).loss.backward()
        assert not flat.grads[~flat.mask].any()
        assert flat.grads[flat.mask].any()
        optimizer.step()
        flat.zero_grad()
    assert torch.equal(flat.values[~flat.mask], flat.base[~flat.mask])
    assert not torch.equal(flat.values[flat.mask], flat.base[flat.mask])


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda model, optimizer: model.double(), "no longer lies in the flat buffer"),
        (lambda model, optimizer: model.zero_grad(), "no longer lies in the flat buffer"),
        (lambda model, optimizer: optimizer.zero_grad(), "no longer has the flat gradient"),
    ],
    ids=["model.double()", "model.zero_grad()", "optimizer.zero_grad()"],
)
def test_a_broken_view_is_detected(break_it, message):
    model, flat = flattened()
    flat.check()
    break_it(model, torch.optim.AdamW([flat.param]))
    with pytest.raises(RuntimeError, match=message):
        flat.check()
