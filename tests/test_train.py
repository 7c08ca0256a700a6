import json
import math
from functools import partial

import pytest
import torch
from transformers import get_scheduler

import train
from bitfit.biases import add_missing_biases, select_biases
from bitfit import loop
from bitfit.collate import pack_batch, pad_batch
from bitfit.config import TrainConfig, parser
from bitfit.data import encode
from bitfit.delta import apply_delta, read_delta
from bitfit.errors import BitfitError
from bitfit.flat import FlatBiases
from bitfit.loop import input_tokens, label_tokens, loss_sum, lr_factor, make_windows, regroup
from bitfit.tasks import builtin_records
from tiny import tiny_bloom, tiny_llama, tiny_tokenizer, window_loss_and_gradient


def saved(make_model, folder, padding_side="right"):
    """A tiny model and tokenizer saved as a model folder, as a user would point --model at."""
    make_model().save_pretrained(folder)
    tiny_tokenizer(padding_side=padding_side).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(("make_model", "padding_side"), [(tiny_bloom, "left"), (tiny_llama, "right")])
def test_train_py_runs_end_to_end_and_writes_a_loadable_delta(make_model, padding_side, tmp_path):
    model_dir = saved(make_model, tmp_path / "model", padding_side)
    out = tmp_path / "run"
    code = train.main(["--model", model_dir, "--split", "train[:48]", "--eval-split", "heldout[:8]",
                       "--max-new-tokens", "4", "--lr", "1e-2", "--out-dir", str(out)])
    assert code == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert TrainConfig.from_dict(json.loads((out / "config.json").read_text())).model == model_dir
    results = json.loads((out / "results.json").read_text())
    assert set(results["before"]) >= {"loss", "exact_match"} and math.isfinite(results["after"]["loss"])

    base = make_model()
    before = base(torch.tensor([[5, 6, 7]])).logits
    apply_delta(base, str(out / "delta.safetensors"))
    assert not torch.allclose(before, base(torch.tensor([[5, 6, 7]])).logits)
    assert read_delta(str(out / "delta.safetensors"))[1]["base_model"] == model_dir


def test_a_finished_run_is_not_overwritten_without_overwrite(tmp_path):
    model_dir = saved(tiny_bloom, tmp_path / "model")
    args = ["--model", model_dir, "--split", "train[:8]", "--eval-split", "heldout[:2]", "--max-new-tokens", "2",
            "--out-dir", str(tmp_path / "run")]
    assert train.main(args) == 0
    assert train.main(args) == 2
    assert train.main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("make_model", [tiny_bloom, tiny_llama])
def test_accumulating_8_micro_batches_of_1_equals_one_padded_batch_of_8(make_model, padding_side):
    tokenizer = tiny_tokenizer(padding_side=padding_side)
    examples, _ = encode(builtin_records("train")[:8], tokenizer)
    assert len({len(e["input_ids"]) for e in examples}) > 1, "the batch of 8 must need padding"

    def flat_gradient(micro_batches: list[list]) -> torch.Tensor:
        model = make_model()
        add_missing_biases(model)
        flat = FlatBiases(model, select_biases(model))
        batches = [pad_batch(micro, tokenizer.pad_token_id, padding_side) for micro in micro_batches]
        n_labels = sum(label_tokens(batch) for batch in batches)
        for batch in batches:
            (loss_sum(model, batch) / n_labels).backward()
        return flat.grads.clone()

    accumulated = flat_gradient([[example] for example in examples])
    one_batch = flat_gradient([examples])
    torch.testing.assert_close(accumulated, one_batch, rtol=0, atol=1e-6)


def test_a_packed_row_gives_the_loss_and_gradient_of_the_padded_batch():
    tokenizer = tiny_tokenizer()
    examples, _ = encode(builtin_records("train")[:8], tokenizer)
    padded = pad_batch(examples, tokenizer.pad_token_id, "right")
    packed = pack_batch(examples)
    assert label_tokens(packed) == label_tokens(padded)
    assert input_tokens(packed) == input_tokens(padded) < padded["input_ids"].numel()
    (loss_padded, grad_padded), (loss_packed, grad_packed) = (window_loss_and_gradient(tiny_llama(), batch)
                                                              for batch in (padded, packed))
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_packed, grad_padded, rtol=0, atol=1e-6)


def test_the_packing_check_catches_examples_that_see_each_other(monkeypatch):
    tokenizer = tiny_tokenizer()
    examples, _ = encode(builtin_records("train")[:8], tokenizer)
    pad = partial(pad_batch, pad_token_id=tokenizer.pad_token_id, padding_side="right")
    model = tiny_llama()
    assert loop.packing_gap(model, examples, pad) < 1e-6

    def leaky_pack(examples):  # one unbroken run of positions: plain causal attention across the whole row
        batch = pack_batch(examples)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
        return batch

    monkeypatch.setattr(loop, "pack_batch", leaky_pack)
    assert loop.packing_gap(model, examples, pad) > 10 * train.PACKING_TOLERANCE


@pytest.mark.parametrize("make_model", [tiny_bloom, tiny_llama])
def test_logits_at_label_positions_only_give_the_full_logits_loss(make_model):
    tokenizer = tiny_tokenizer(padding_side="left")
    examples, _ = encode(builtin_records("train")[:4], tokenizer)
    batch = pad_batch(examples, tokenizer.pad_token_id, "left")
    model = make_model()
    with torch.no_grad():
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        extra = {"position_ids": positions} if make_model is tiny_llama else {}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits
        full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum")
        torch.testing.assert_close(loss_sum(model, batch), full, rtol=1e-6, atol=1e-5)


def test_the_loss_goes_down_on_a_tiny_model(tmp_path):
    model_dir = saved(tiny_bloom, tmp_path / "model")
    assert train.main(["--model", model_dir, "--split", "train[:160]", "--eval-split", "heldout[:2]",
                       "--max-new-tokens", "2", "--lr", "1e-1", "--out-dir", str(tmp_path / "run")]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_a_bf16_autocast_run_stays_finite(tmp_path):
    model_dir = saved(tiny_llama, tmp_path / "model")
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, "--split", "train[:16]", "--eval-split", "heldout[:2]",
                       "--max-new-tokens", "2", "--bf16", "--bf16-weights", "--out-dir", str(out)]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(loss) for loss in losses)
    delta, _ = read_delta(str(out / "delta.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in delta.values())


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_the_lr_schedule_is_transformers_schedule_step_for_step(schedule):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_scheduler(f"{schedule}_with_warmup" if schedule == "constant" else schedule, optimizer,
                           num_warmup_steps=3, num_training_steps=20)
    for step in range(20):
        assert lr_factor(step, 20, 3, schedule) == pytest.approx(theirs.get_last_lr()[0], abs=1e-12)
        optimizer.step()
        theirs.step()


def test_windows_cover_every_example_once_per_epoch_in_a_seeded_order():
    windows = make_windows(20, batch_size=2, grad_accum=4, epochs=2, seed=0)
    assert [len(w) for w in windows] == [4, 4, 2, 4, 4, 2]  # 10 micro-batches an epoch; the short window kept
    seen = [i for w in windows for micro in w for i in micro]
    assert sorted(seen[:20]) == sorted(seen[20:]) == list(range(20))
    assert seen[:20] != list(range(20)) and seen[:20] != seen[20:]  # shuffled, differently each epoch
    assert make_windows(20, 2, 4, 2, seed=0) == windows


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(BitfitError, match=r"unknown config keys \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(BitfitError, match="--schedule must be one of"):
        TrainConfig(schedule="step")
    with pytest.raises(BitfitError, match="--grad-accum must be at least 1"):
        TrainConfig(grad_accum=0)


def test_every_flag_has_help_and_shows_its_default():
    cli = parser()
    flags = [a for a in cli._actions if a.dest != "help"]
    assert {a.dest for a in flags} == set(TrainConfig.__dataclass_fields__)
    assert all(a.help for a in flags)
    assert "(default: 8)" in cli.format_help()
    assert cli.parse_args(["--lr", "2e-4", "--no-add-biases"]).lr == 2e-4


def test_lr_is_the_papers_1e_3_unless_training_on_the_builtin_task():
    assert TrainConfig(data="yahma/alpaca-cleaned").lr == 1e-3
    assert TrainConfig().lr == 5e-3
    assert TrainConfig(lr=2e-4).lr == 2e-4


def test_regrouping_a_window_into_passes_keeps_every_example_once_longest_first():
    lengths = [5, 9, 2, 7, 9, 1, 4, 3]
    window = [[0], [1], [2], [3], [4], [5], [6], [7]]
    passes = regroup(window, pass_size=3, lengths=lengths)
    assert [len(p) for p in passes] == [3, 3, 2]
    assert sorted(i for p in passes for i in p) == list(range(8))
    assert [lengths[i] for p in passes for i in p] == sorted(lengths, reverse=True)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_run_in_passes_of_8_trains_like_micro_batches_of_1(packed, tmp_path):
    model_dir = saved(tiny_llama, tmp_path / "model")
    args = ["--model", model_dir, "--split", "train[:24]", "--eval-data", "none", "--lr", "1e-2"]
    assert train.main([*args, "--out-dir", str(tmp_path / "one")]) == 0
    assert train.main([*args, "--pass-size", "8", *(["--pack"] if packed else []),
                       "--out-dir", str(tmp_path / "eight")]) == 0
    one, eight = read_delta(str(tmp_path / "one" / "delta.safetensors"))[0], read_delta(str(tmp_path / "eight" / "delta.safetensors"))[0]
    flat_one, flat_eight = (torch.cat([d[k].reshape(-1) for k in sorted(d) if "k_proj" not in k]) for d in (one, eight))
    assert torch.linalg.vector_norm(flat_one - flat_eight) / torch.linalg.vector_norm(flat_one) < 1e-5
