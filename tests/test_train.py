import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import get_scheduler

import train
from bitfit.core.biases import add_missing_biases, select_biases
from bitfit.core.errors import BitfitError
from bitfit.core.flat import FlatBiases
from bitfit.core.loss import label_tokens, loss_sum
from bitfit.core.step import lr_factor
from bitfit.data.collate import pad_batch
from bitfit.data.examples import encode
from bitfit.data.tasks import builtin_records
from bitfit.model import pretrained
from bitfit.model.delta import apply_delta, read_delta
from bitfit.run.config import TrainConfig, from_args, parser
from tiny import tiny_bloom, tiny_llama, tiny_tokenizer


def saved(make_model, folder, padding_side="right"):
    """A tiny model and tokenizer saved as a model folder, as a user would point --model at."""
    make_model().save_pretrained(folder)
    tiny_tokenizer(padding_side=padding_side).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_loss_goes_down_on_a_tiny_model(tmp_path):
    model_dir = saved(tiny_bloom, tmp_path / "model")
    assert train.main(["--model", model_dir, "--split", "train[:160]", "--eval-split", "heldout[:2]",
                       "--max-new-tokens", "2", "--lr", "1e-1", "--out-dir", str(tmp_path / "run")]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


@pytest.mark.slow
@pytest.mark.parametrize(("make_model", "biases"), [(tiny_llama, "all"), (tiny_bloom, "all"), (tiny_bloom, "reduced")])
def test_a_bf16_autocast_run_with_bf16_weights_stays_finite(tmp_path, make_model, biases):
    """BLOOM: LayerNorms with biases, trained (all) or frozen (reduced), on the CPU too."""
    model_dir = saved(make_model, tmp_path / "model")
    out = tmp_path / "run"
    assert train.main(["--model", model_dir, "--split", "train[:16]", "--eval-split", "heldout[:2]", "--biases", biases,
                       "--max-new-tokens", "2", "--bf16", "--bf16-weights", "--out-dir", str(out)]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(loss) for loss in losses)
    delta, _ = read_delta(str(out / "delta.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in delta.values())


def test_bf16_weights_keep_a_layernorm_in_fp32_and_the_matrices_in_bf16():
    model = tiny_bloom().to(torch.bfloat16)
    pretrained.norms_in_fp32(model)
    params = dict(model.named_parameters())
    assert params["transformer.h.0.input_layernorm.weight"].dtype == torch.float32
    assert params["transformer.h.0.input_layernorm.bias"].dtype == torch.float32  # trained or not
    assert params["transformer.h.0.self_attention.query_key_value.weight"].dtype == torch.bfloat16


def test_an_unknown_schedule_is_refused_not_taken_as_constant():
    with pytest.raises(ValueError, match="unknown schedule 'cosine-with-restarts'"):
        lr_factor(5, 10, 0, "cosine-with-restarts")


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_the_lr_schedule_is_transformers_schedule_step_for_step(schedule):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_scheduler(f"{schedule}_with_warmup" if schedule == "constant" else schedule, optimizer,
                           num_warmup_steps=3, num_training_steps=20)
    for step in range(20):
        assert lr_factor(step, 20, 3, schedule) == pytest.approx(theirs.get_last_lr()[0], abs=1e-12)
        optimizer.step()
        theirs.step()


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(BitfitError, match=r"unknown config keys \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(BitfitError, match="--schedule must be one of"):
        TrainConfig(schedule="step")
    with pytest.raises(BitfitError, match="--grad-accum must be at least 1"):
        TrainConfig(grad_accum=0)
    with pytest.raises(BitfitError, match="--layout must be one of"):
        TrainConfig(layout="pack")


def test_on_the_cpu_a_pass_holds_at_most_what_one_micro_batch_of_the_hf_trainer_recipe_can_hold_unless_told_otherwise():
    assert TrainConfig(device="cpu").max_pass_tokens == 256  # --batch-size 1 x --max-len 256
    assert TrainConfig(device="cpu", batch_size=2, max_len=512).max_pass_tokens == 1024
    assert TrainConfig(device="cpu", max_pass_tokens=100).max_pass_tokens == 100


def test_a_saved_config_of_the_layout_once_called_seeds_resumes_as_the_trainer_layout():
    saved = json.loads(TrainConfig(layout="trainer").to_json()) | {"layout": "seeds"}  # as such a run saved it
    assert TrainConfig.from_dict(saved).layout == "trainer"


def test_a_token_budget_with_the_trainer_layout_is_refused_as_meaningless():
    with pytest.raises(BitfitError, match="--max-pass-tokens has no effect with --layout trainer"):
        TrainConfig(layout="trainer", max_pass_tokens=1024)
    assert TrainConfig(layout="trainer").layout == "trainer"


def test_every_flag_has_help_and_shows_its_default():
    cli = parser()
    flags = [a for a in cli._actions if a.dest != "help"]
    assert {a.dest for a in flags} == set(TrainConfig.__dataclass_fields__)
    assert all(a.help for a in flags)
    assert "(default: 8)" in cli.format_help()
    assert cli.parse_args(["--lr", "2e-4", "--no-add-biases"]).lr == 2e-4


def test_the_default_lr_is_one_value_whatever_the_data():
    assert TrainConfig(data="yahma/alpaca-cleaned").lr == TrainConfig().lr == 5e-3  # the sweep's best (README)
    assert TrainConfig(lr=2e-4).lr == 2e-4


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_a_run_trains_alike_in_every_layout(layout, tmp_path, capsys):
    model_dir = saved(tiny_llama, tmp_path / "model")
    args = ["--model", model_dir, "--split", "train[:24]", "--eval-data", "none", "--lr", "1e-2"]
    assert train.main([*args, "--layout", "trainer", "--out-dir", str(tmp_path / "trainer")]) == 0
    assert train.main([*args, "--layout", layout, "--max-pass-tokens", "128", "--out-dir", str(tmp_path / layout)]) == 0
    assert f"layout: {layout} | a step = 8 examples" in capsys.readouterr().out
    trainer, other = (read_delta(str(tmp_path / name / "delta.safetensors"))[0] for name in ("trainer", layout))
    # Key biases left out: their exact gradient is zero, so their steps are rounding noise (see test_distributed).
    flat_trainer, flat_other = (torch.cat([d[k].reshape(-1) for k in sorted(d) if "k_proj" not in k]) for d in (trainer, other))
    assert torch.linalg.vector_norm(flat_trainer - flat_other) / torch.linalg.vector_norm(flat_trainer) < 1e-5


@pytest.mark.slow
def test_auto_packs_a_model_with_position_ids_and_pads_an_alibi_one_which_packs_when_asked(tmp_path, capsys):
    args = ["--split", "train[:8]", "--eval-data", "none"]
    for make_model, layout, expected in ((tiny_llama, "auto", "layout: packed"), (tiny_bloom, "auto", "layout: padded"),
                                         (tiny_bloom, "packed", "layout: packed")):
        model_dir = saved(make_model, tmp_path / make_model.__name__)
        assert train.main(["--model", model_dir, *args, "--layout", layout,
                           "--out-dir", str(tmp_path / f"run-{make_model.__name__}-{layout}")]) == 0
        out = capsys.readouterr().out
        assert expected in out
        if layout == "auto" and make_model is tiny_bloom:  # its attention would score the packed row's square
            assert "not packed: BloomForCausalLM takes no position ids" in out


@pytest.mark.parametrize("flag, value, message", [
    ("lr", math.inf, "--lr must be a finite number"), ("lr", math.nan, "--lr must be a finite number"),
    ("lr", 0.0, "--lr must be positive"), ("weight_decay", math.inf, "--weight-decay must be a finite number"),
    ("eps", 0.0, "--eps must be positive, not 0.0: AdamW divides"), ("eps", math.nan, "--eps must be a finite number"),
    ("beta1", 1.5, r"--beta1 must be in \[0, 1\)"), ("beta2", -1.0, r"--beta2 must be in \[0, 1\)"),
    ("beta2", 1.0, r"--beta2 must be in \[0, 1\)"), ("grad_clip", math.nan, "--grad-clip must be a finite number"),
    ("seed", 10**22, r"--seed must be in \[0, 2\*\*63\)"), ("seed", -1, r"--seed must be in \[0, 2\*\*63\)"),
    ("device", "tpu", "--device must be"), ("device", "cuda:abc", "--device must be"), ("device", "meta", "--device must be"),
])
def test_every_numeric_flag_must_be_finite_and_in_its_range(flag, value, message):
    with pytest.raises(BitfitError, match=message):
        TrainConfig(**{flag: value})


@pytest.mark.parametrize("flags, message", [
    ({"grad_clip": 1e-320}, r"--grad-clip 9.99989e-321 is below 10000 x --eps \(0.0001\): AdamW divides"),
    ({"grad_clip": 1e-6, "eps": 1e-8}, r"--grad-clip 1e-06 is below"), ({"grad_clip": 1e-3, "eps": 1e-6}, r"below"),
    ({"lr": 1e-320}, r"--lr 9.99989e-321 is below 1e-08: AdamW moves each bias by about lr a step"),
    ({"eps": 1.0}, r"--eps 1 is above 0.001: AdamW divides each step by the gradient's size plus eps"),
    ({"eps": 1e-300}, r"--eps 1e-300 is below 1.2e-38, the smallest normal float32"),
])
def test_a_value_too_small_to_move_any_bias_is_refused_with_its_reason(flags, message):
    with pytest.raises(BitfitError, match=message):
        TrainConfig(**flags)
    TrainConfig(grad_clip=0.0)  # no clipping at all is no tiny clip
    TrainConfig(lr=1e-8, grad_clip=1e-3), TrainConfig(eps=1e-3, grad_clip=0.0)  # the bounds themselves are allowed
    TrainConfig(lr=0.1, weight_decay=0.1)  # 0.1 x 0.1 is the bound, 0.01, whatever float rounding makes of it


def test_an_evaluation_file_is_used_whole_unless_a_split_is_given():
    assert TrainConfig().eval_split == "heldout[:100]"  # the built-in task's held-out split
    assert TrainConfig(data="mine.jsonl", eval_data="heldout.jsonl").eval_split == "train"  # all of the file
    assert TrainConfig(data="mine.jsonl", eval_data="heldout.jsonl", eval_split="train[:10]").eval_split == "train[:10]"


def on_a_gpu_of(monkeypatch, memory: float) -> None:
    """As if this machine had one CUDA GPU of `memory` bytes (only the config asks)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=int(memory)))


def test_bf16_on_cuda_stores_the_frozen_weights_in_bf16_unless_told_not_to(monkeypatch):
    assert not TrainConfig(bf16=True, device="cpu").bf16_weights
    on_a_gpu_of(monkeypatch, 80e9)
    assert TrainConfig(bf16=True).bf16_weights and not TrainConfig(bf16=False).bf16_weights
    assert not from_args(["--bf16", "--no-bf16-weights"]).bf16_weights
    assert from_args(["--bf16"]).bf16_weights


def test_the_pass_budget_on_cuda_comes_from_the_gpus_memory_and_a_given_one_is_kept(monkeypatch):
    on_a_gpu_of(monkeypatch, 80e9)
    assert TrainConfig().max_pass_tokens == 4096
    assert TrainConfig(max_pass_tokens=512).max_pass_tokens == 512
    assert TrainConfig(device="cpu").max_pass_tokens == 256


@pytest.mark.slow
def test_compiled_blocks_train_to_the_losses_of_eager_ones(tmp_path):
    # One block and no generation: compiling is what costs here (tens of seconds), each block and shape anew.
    model_dir = saved(lambda: tiny_llama(blocks=1), tmp_path / "model")
    args = ["--model", model_dir, "--split", "train[:24]", "--eval-data", "none"]
    assert train.main([*args, "--out-dir", str(tmp_path / "eager")]) == 0
    assert train.main([*args, "--compile", "--out-dir", str(tmp_path / "compiled")]) == 0
    eager, compiled = ([json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                       for run in ("eager", "compiled"))
    assert len(eager) == 3 and compiled == pytest.approx(eager, rel=1e-5)


def test_compile_with_sharded_weights_is_refused():
    with pytest.raises(BitfitError, match="--compile with --shard-weights is untested"):
        TrainConfig(compile=True, shard_weights=True)
