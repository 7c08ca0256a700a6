"""Classification and regression (--task classify / regress): BitFit's own GLUE setting, on tiny encoders
(BERT, RoBERTa), a tiny Llama with a score head, and the embedded all-MiniLM-L6-v2."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from test_train import saved
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

import train
from bitfit.core.biases import (
    add_missing_biases,
    count_trainable,
    describe,
    select_biases,
)
from bitfit.core.errors import BitfitError
from bitfit.core.flat import FlatBiases
from bitfit.core.loss import label_tokens, loss_sum
from bitfit.data.collate import pad_labelled
from bitfit.data.labelled import encode_labelled
from bitfit.model import pretrained
from bitfit.model.delta import apply_delta, read_delta, save_delta
from tiny import tiny_encoder, tiny_llama, tiny_tokenizer

QUICK = ["--split", "train[:48]", "--eval-split", "heldout[:32]", "--lr", "1e-2"]
ENCODERS = {"bert": lambda: tiny_encoder("bert"), "roberta": lambda: tiny_encoder("roberta"), "llama": tiny_llama}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("encoders")
    return {kind: saved(make, root / kind) for kind, make in ENCODERS.items()}


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# --- what trains ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "biases", "head", "total"), [
    ("base", 102_912, 1_538, 109_483_778),
    ("large", 272_384, 2_050, 335_143_938),
])
def test_bert_trains_its_biases_and_the_new_head_in_the_papers_share(size, biases, head, total):
    shape = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
             "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)}[size]
    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig(**shape, num_labels=2))
    new = ["classifier.bias", "classifier.weight"]
    selection = select_biases(model, "all", new)
    assert count_trainable(model, selection) == (biases + head, total)
    assert describe(*count_trainable(model, selection), {name: model.get_parameter(name).numel() for name in new}) == \
        f"trainable: {biases:,} biases + {head:,} new (classifier.bias, classifier.weight) = {biases + head:,} / " \
        f"{total:,} parameters ({100 * (biases + head) / total:.4f}%)"
    if size == "large":
        assert f"{100 * (biases + head) / total:.3f}" == "0.082"  # the paper's 0.08%
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert all(not name.endswith(".bias") and name not in new for name in frozen)


def test_a_checkpoint_without_a_pooler_gets_one_that_trains_whole(tmp_path):
    folder = saved(lambda: tiny_encoder("bert", pooler=False), tmp_path / "bert")
    torch.manual_seed(0)
    model, _, new = pretrained.load_classifier(folder, ["a", "b"])
    assert new == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]
    selection = select_biases(model, "all", new)
    assert set(new) <= set(selection)
    assert not any(p.requires_grad for name, p in model.named_parameters() if name not in selection)


def test_the_embedded_encoder_has_a_pooler_so_only_its_classifier_is_new():
    torch.manual_seed(0)
    model, tokenizer, new = pretrained.load_classifier(pretrained.EMBEDDED_ENCODER, ["negative", "positive"])
    assert new == ["classifier.bias", "classifier.weight"] and model.config.model_type == "bert"
    assert model.config.id2label == {0: "negative", 1: "positive"}


# --- the loss ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("task", ["classify", "regress"])
def test_eight_batches_of_one_accumulate_to_the_gradient_of_one_batch_of_eight(task, folders):
    torch.manual_seed(0)
    model, tokenizer, new = pretrained.load_classifier(folders["bert"], ["negative", "positive"] if task == "classify" else None)
    flat = FlatBiases(model, select_biases(model, "all", new))
    rows = [{"text": f"The {word} was fine, I think {'!' * i}", "label": i % 2 if task == "classify" else i / 3}
            for i, word in enumerate("movie book phone hotel meal laptop concert game".split())]
    examples = encode_labelled(rows, [f"row {i}" for i in range(8)], tokenizer, 64, task, [0, 1] if task == "classify" else None)
    model.eval()  # no dropout: the same function twice

    def gradient(batches):
        flat.zero_grad()
        total = sum(label_tokens(batch) for batch in batches)
        for batch in batches:
            loss_sum(model, batch).backward()
        return flat.grads.clone() / total

    one = gradient([pad_labelled(examples, 0)])
    eight = gradient([pad_labelled([example], 0) for example in examples])
    # The tolerance comes from the arithmetic, not from one CPU's rounding: each bias's gradient sums one fp32
    # term per token of the batch, added in another order (and through matmuls of other shapes) when batched,
    # so the two may differ by about that many roundings (2**-24 each) of the gradient's scale. A mistake in
    # what is summed or divided is of the gradient's own size, a thousand times more.
    additions = sum(len(example["input_ids"]) for example in examples)
    torch.testing.assert_close(eight, one, rtol=0, atol=additions * 2**-24 * one.abs().max().item())


def test_a_labelled_batch_is_padded_to_its_longest_row_with_one_label_per_row():
    examples = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 1], "label": 1},
                {"input_ids": [5], "attention_mask": [1], "token_type_ids": [0], "label": 0}]
    batch = pad_labelled(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]] and batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    floats = pad_labelled([{**examples[0], "label": 2.5}], pad_token_id=0, padding_side="left")
    assert floats["labels"].dtype == torch.float32


# --- whole runs -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", list(ENCODERS))
def test_a_classifier_trains_end_to_end_and_reports_accuracy_f1_and_mcc(kind, folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--task", "classify", "--model", folders[kind], *QUICK, "--out-dir", str(out)]) == 0
    log = capsys.readouterr().out
    assert "task: classify, 2 classes: negative, positive; the checkpoint lacks " in log
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "classify" and results["classes"] == ["negative", "positive"]
    for when in ("before", "after"):
        assert set(results[when]) == {"loss", "accuracy", "f1", "mcc", "seconds"}
    assert results["after"]["loss"] < results["before"]["loss"]
    tensors, metadata = read_delta(str(out / "delta.safetensors"))
    assert metadata["format"] == "bitfit-delta/3" and json.loads(metadata["classes"]) == ["negative", "positive"]
    head = json.loads(metadata["head"])
    assert head and all(name in tensors for name in head)


@pytest.mark.slow
def test_a_regressor_trains_end_to_end_and_reports_pearson_and_spearman(folders, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--task", "regress", "--model", folders["bert"], *QUICK, "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["after"]) == {"loss", "pearson", "spearman", "seconds"} and "classes" not in results
    assert results["after"]["loss"] < results["before"]["loss"]
    assert json.loads(read_delta(str(out / "delta.safetensors"))[1]["classes"]) == []


@pytest.mark.slow
def test_string_classes_get_ids_in_sorted_order_saved_with_the_run_and_in_the_model(folders, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "label": ["zebra", "ant", "moth"][i % 3]} for i in range(24)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    assert train.main(["--task", "classify", "--model", folders["bert"], "--data", str(data), "--eval-data", "none",
                       "--out-dir", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["classes"] == ["ant", "moth", "zebra"]
    model, _, _ = pretrained.load_classifier(folders["bert"], ["ant", "moth", "zebra"])
    apply_delta(model, str(out / "delta.safetensors"))
    assert model.config.id2label == {0: "ant", 1: "moth", 2: "zebra"}


@pytest.mark.slow
@pytest.mark.parametrize(("rows", "message"), [
    ([{"text": "a"}], r"data.jsonl line 1: no 'label' field"),
    ([{"text": "a", "label": None}], r"data.jsonl line 1: the label is null"),
    ([{"text": "a", "label": True}], r"data.jsonl line 1: --task classify needs an int or a non-empty string"),
    ([{"text": "a", "label": 1.5}], r"line 1: .*found float 1.5; for a number to predict use --task regress"),
    ([{"text": "a", "label": -1}], r"line 1: label -1 is no class \(GLUE's test splits"),
    ([{"text": "a", "label": [1]}], r"line 1: --task classify needs an int or a non-empty string"),
    ([{"label": 1}], r"line 1: a labelled row needs the fields text"),
    ([{"text": 3, "label": 1}], r"line 1: 'text' must be a string"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": 1}], r"every row has the label 1 .*at least two classes"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": "x"}], r"the labels mix numbers and strings"),
])
def test_a_bad_label_is_one_error_line_naming_file_and_line_and_nothing_trains(rows, message, folders, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert train.main(["--task", "classify", "--model", folders["bert"], "--data", str(data), "--eval-data", "none",
                       "--out-dir", str(tmp_path / "run")]) == 2
    last = last_error(capsys)
    assert last.startswith("error: training data: ") and __import__("re").search(message, last), last
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("label", "message"), [("abc", "--task regress needs a number as the label"),
                                                ("NaN", "the label is nan, not a finite number")])
def test_a_regression_label_must_be_a_finite_number(label, message, folders, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "a", "label": 1.5}) + "\n" + '{"text": "b", "label": ' +
                    (json.dumps(label) if label != "NaN" else "NaN") + "}\n")
    assert train.main(["--task", "regress", "--model", folders["bert"], "--data", str(data), "--eval-data", "none",
                       "--out-dir", str(tmp_path / "run")]) == 2
    assert f"data.jsonl line 2: {message}" in last_error(capsys)


@pytest.mark.slow
def test_a_held_out_class_the_training_data_never_had_is_one_error_line(folders, tmp_path, capsys):
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": "x", "label": "neutral"}) + "\n")
    assert train.main(["--task", "classify", "--model", folders["bert"], "--split", "train[:16]",
                       "--eval-data", str(tmp_path / "eval.jsonl"), "--out-dir", str(tmp_path / "run")]) == 2
    assert "error: evaluation data: " in (last := last_error(capsys)) and \
        "eval.jsonl line 1: label 'neutral' is not one of the training data's classes ['negative', 'positive']" in last


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "message"), [
    (["--template", "chat"], "--template is for --task lm"), (["--max-new-tokens", "4"], "--max-new-tokens is for --task lm"),
    (["--layout", "packed"], "--layout packed joins examples end to end"), (["--task", "tag"], "--task must be one of"),
])
def test_a_flag_that_means_nothing_for_a_labelled_task_is_refused(flags, message, capsys):
    assert train.main(["--task", "classify", *flags]) == 2
    assert message in last_error(capsys)


# --- the delta of a classifier ----------------------------------------------------------------------

def tuned(folder: str, classes, seed: int = 0):
    """A classifier of `folder` whose biases and head moved, and its flat buffer."""
    torch.manual_seed(seed)
    model, _, head = pretrained.load_classifier(folder, classes)
    added = add_missing_biases(model)
    flat = FlatBiases(model, select_biases(model, "all", head))
    with torch.no_grad():
        flat.values.add_(torch.randn_like(flat.values) * 0.1)
    return model.eval(), flat, added, head


@pytest.mark.parametrize("kind", list(ENCODERS))
@pytest.mark.parametrize("classes", [["no", "yes"], None])
def test_a_fresh_base_plus_a_classifiers_delta_gives_the_tuned_logits(kind, classes, folders, tmp_path):
    model, flat, added, head = tuned(folders[kind], classes)
    path = tmp_path / "delta.safetensors"
    save_delta(str(path), model, flat, base_model=folders[kind], added=added, head=head,
               task="classify" if classes else "regress", classes=classes)
    ids = torch.tensor([[5, 17, 42, 9], [7, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(123)  # the fresh base's head is another draw: the delta must set it, not add to it
    fresh, _, _ = pretrained.load_classifier(folders[kind], classes)
    apply_delta(fresh, str(path))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-5)
    with safe_open(str(path), "pt") as file:
        assert all(file.get_tensor(name).shape == model.get_parameter(name).shape for name in head)


def test_a_classifiers_delta_refuses_a_base_it_was_not_trained_on(folders, tmp_path):
    model, flat, added, head = tuned(folders["bert"], ["no", "yes"])
    path = tmp_path / "delta.safetensors"
    save_delta(str(path), model, flat, base_model=folders["bert"], added=added, head=head, task="classify",
               classes=["no", "yes"])
    other = saved(lambda: tiny_encoder("bert", seed=7), tmp_path / "other")
    fresh, _, _ = pretrained.load_classifier(other, ["no", "yes"])
    with pytest.raises(BitfitError, match="this model's fingerprint is .*, but this delta was trained on"):
        apply_delta(fresh, str(path))
    three, _, _ = pretrained.load_classifier(folders["bert"], ["a", "b", "c"])
    with pytest.raises(BitfitError, match=r"this model's head has 3 outputs and the delta's 2 \(classify: no, yes\)"):
        apply_delta(three, str(path))


# --- the offline default ----------------------------------------------------------------------------

@pytest.mark.slow
def test_the_default_classify_run_gains_at_least_30_points_of_held_out_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--task", "classify", "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["after"]["accuracy"] - results["before"]["accuracy"] >= 0.30, (results["before"], results["after"])
    assert math.isfinite(results["after"]["mcc"])
    log = capsys.readouterr().out
    assert "trainable: 26,112 biases + 770 new (classifier.bias, classifier.weight) = 26,882 / 22,713,986" in log


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_a_merged_classifier_loads_with_plain_transformers_to_the_tuned_logits_and_its_classes(kind, folders, tmp_path, capsys):
    from bitfit.export import merge

    model, flat, added, head = tuned(folders[kind], ["no", "yes", "maybe"])
    path = tmp_path / "delta.safetensors"
    save_delta(str(path), model, flat, base_model=folders[kind], added=added, head=head, task="classify",
               classes=["no", "yes", "maybe"])
    assert merge.main(["--delta", str(path), "--out", str(tmp_path / "merged")]) == 0
    assert "AutoModelForSequenceClassification.from_pretrained(" in capsys.readouterr().out
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()  # no bitfit code
    assert plain.config.id2label == {0: "no", 1: "yes", 2: "maybe"}
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_a_classifiers_peft_adapter_saves_the_head_whole_and_loads_to_the_tuned_logits(kind, folders, tmp_path):
    from peft import PeftModel

    from bitfit.export import adapter

    model, flat, added, head = tuned(folders[kind], ["no", "yes"])
    path = tmp_path / "delta.safetensors"
    save_delta(str(path), model, flat, base_model=folders[kind], added=added, head=head, task="classify",
               classes=["no", "yes"])
    assert adapter.main(["--delta", str(path), "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and {"llama": "score"}.get(kind, "classifier") in \
        config["modules_to_save"]
    torch.manual_seed(99)  # another random head in the base: the adapter's must replace it
    base = AutoModelForSequenceClassification.from_pretrained(folders[kind], num_labels=2)
    base.config.pad_token_id = model.config.pad_token_id
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.tensor([[5, 17, 42, 9], [7, 3, 11, 2]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    torch.manual_seed(5)
    again, _, _ = pretrained.load_classifier(folders[kind], ["no", "yes"])  # the folder read back as the delta
    apply_delta(again, str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_inspect_draws_a_classifiers_change_by_berts_bias_types(folders, tmp_path, capsys):
    from bitfit.export import inspection as inspect_delta

    out = tmp_path / "run"
    assert train.main(["--task", "classify", "--model", folders["bert"], *QUICK, "--out-dir", str(out)]) == 0
    capsys.readouterr()
    assert inspect_delta.main([str(out)]) == 0
    said = capsys.readouterr().out
    header = next(line for line in said.splitlines() if line.startswith("layer "))
    for kind in ("query", "key", "value", "attention output", "attention LayerNorm", "intermediate", "output LayerNorm"):
        assert f" {kind}" in header
    for kind in ("attention output", "attention LayerNorm", "intermediate", "output LayerNorm"):
        assert f"  {kind} " in said  # the table by bias type
    assert "outside the blocks: bert.pooler.dense.bias" in said and "classifier" not in said  # the head: no change to show
    assert (out / "bias_change.png").is_file()


# --- classifying new text ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(ENCODERS))
def test_many_classifier_deltas_in_one_batch_equal_each_delta_alone(kind, folders, tmp_path):
    from bitfit.infer.mixed import classify_many

    tasks = {"two": ["no", "yes"], "three": ["a", "b", "c"], "number": None}
    paths = {}
    for seed, (name, classes) in enumerate(tasks.items()):
        model, flat, added, head = tuned(folders[kind], classes, seed=seed)
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_delta(paths[name], model, flat, base_model=folders[kind], added=added, head=head,
                   task="classify" if classes else "regress", classes=classes)
    texts = [("Add these two numbers.",), ("Sort these numbers from smallest to largest: 9 3 1",), ("Reverse it",)]
    requests = [(text, paths[name]) for text in texts for name in tasks]  # every row of a batch another task
    base, tokenizer, _ = pretrained.load_classifier(folders[kind], ["x", "y", "z", "w"])  # a head of none of theirs
    probe = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = base.eval()(input_ids=probe).logits
    mixed = classify_many(base, tokenizer, requests)
    for (text, path), answer in zip(requests, mixed):
        name = next(n for n, p in paths.items() if p == path)
        alone, _, _ = pretrained.load_classifier(folders[kind], tasks[name])
        apply_delta(alone, path)
        with torch.no_grad():
            logits = alone.eval()(**{k: torch.tensor([v]) for k, v in tokenizer(*text).items()}).logits[0]
        if tasks[name] is None:
            assert answer["value"] == pytest.approx(logits[0].item(), abs=1e-5)
        else:
            expected = dict(zip(tasks[name], logits.softmax(-1).tolist()))
            assert answer["scores"] == pytest.approx(expected, abs=1e-5)
            assert answer["label"] == max(expected, key=expected.get)
    with torch.no_grad():  # the shared base is as it was: no hook, no head of theirs left behind
        assert torch.equal(base(input_ids=probe).logits, before)


@pytest.mark.slow
def test_classify_prints_each_texts_label_and_probability_and_marks_labelled_rows(folders, tmp_path, capsys):
    from bitfit.infer import classify

    out = tmp_path / "run"
    assert train.main(["--task", "classify", "--model", folders["bert"], *QUICK, "--out-dir", str(out)]) == 0
    rows = [{"text": "The movie was awful.", "label": "negative"}, {"text": "The book was wonderful.", "label": "positive"}]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    capsys.readouterr()
    assert classify.main(["--delta", str(out), "--texts-file", str(tmp_path / "texts.jsonl")]) == 0
    said = capsys.readouterr().out
    assert f"TUNED = {out / 'delta.safetensors'} (classify: negative, positive)" in said
    assert len(__import__("re").findall(r"TUNED: (negative|positive) \(p [01]\.\d{3}\)  \[(right|wrong)\]", said)) == 2
    assert "\ncorrect: TUNED " in said and "/2" in said


@pytest.mark.parametrize(("delta", "args", "message"), [
    ("lm", ["--text", "hi"], "is a causal LM's delta \\(--task lm\\): generate.py uses it"),
    ("classify", [], "give texts to classify: --text \\(repeatable\\) or --texts-file"),
    ("classify", ["--texts-file", "EMPTY"], "--texts-file .* holds no texts"),
])
def test_classify_refuses_an_lm_delta_and_no_texts_in_one_line(delta, args, message, folders, tmp_path, capsys):
    from bitfit.infer import classify

    if delta == "lm":
        llama = saved(tiny_llama, tmp_path / "llama")
        model, _ = pretrained.load(llama)
        added, head, classes = add_missing_biases(model), [], None
    else:
        model, _, head = pretrained.load_classifier(folders["bert"], ["no", "yes"])
        added, classes, llama = [], ["no", "yes"], folders["bert"]
    flat = FlatBiases(model, select_biases(model, "all", head))
    with torch.no_grad():
        flat.values.add_(0.1)
    save_delta(str(tmp_path / "delta.safetensors"), model, flat, base_model=llama, added=added, head=head,
               task="lm" if delta == "lm" else "classify", classes=classes)
    (tmp_path / "empty.txt").write_text("\n\n")
    args = [str(tmp_path / "empty.txt") if arg == "EMPTY" else arg for arg in args]
    assert classify.main(["--delta", str(tmp_path / "delta.safetensors"), *args]) == 2
    assert __import__("re").search(message, last_error(capsys))


def test_generate_refuses_a_classifiers_delta_and_says_what_uses_it(folders, tmp_path, capsys):
    import generate

    model, flat, added, head = tuned(folders["bert"], ["no", "yes"])
    save_delta(str(tmp_path / "delta.safetensors"), model, flat, base_model=folders["bert"], added=added, head=head,
               task="classify", classes=["no", "yes"])
    assert generate.main(["--delta", str(tmp_path / "delta.safetensors"), "--prompt", "hi"]) == 2
    assert "is a classify delta (a classifier's or regressor's): classify text with it by python -m bitfit.infer.classify" \
        in last_error(capsys)


@pytest.mark.slow
def test_int_classes_are_named_by_their_values_in_the_log_the_results_and_the_delta(folders, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}", "label": [0, 2, 1][i % 3]}) + "\n" for i in range(24)))
    out = tmp_path / "run"
    assert train.main(["--task", "classify", "--model", folders["bert"], "--data", str(data), "--eval-data", str(data),
                       "--out-dir", str(out)]) == 0
    assert "task: classify, 3 classes: 0, 1, 2;" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["classes"] == ["0", "1", "2"]
    assert json.loads(read_delta(str(out / "delta.safetensors"))[1]["classes"]) == ["0", "1", "2"]


@pytest.mark.slow
def test_an_interrupted_and_resumed_classifier_run_ends_with_the_same_delta_head_included(folders, tmp_path, monkeypatch):
    import signal

    from test_reliability import signal_in_step

    args = ["--task", "classify", "--model", folders["bert"], *QUICK]
    assert train.main([*args, "--out-dir", str(tmp_path / "straight")]) == 0
    signal_in_step(monkeypatch, 3, [signal.SIGINT])
    assert train.main([*args, "--out-dir", str(tmp_path / "stopped")]) == 130
    monkeypatch.undo()
    assert train.main(["--resume", str(tmp_path / "stopped")]) == 0
    straight, resumed = (read_delta(str(tmp_path / run / "delta.safetensors"))[0] for run in ("straight", "stopped"))
    assert straight.keys() == resumed.keys() and "classifier.weight" in straight
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


@pytest.mark.slow
def test_eval_every_and_the_loss_curve_work_for_a_classifier_as_for_an_lm(folders, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--task", "classify", "--model", folders["bert"], *QUICK, "--eval-every", "2",
                       "--out-dir", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "eval_loss" in line] == [2, 4]  # the last step's is "after"
    assert (out / "loss.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["best"]["step"] in (0, 2, 4, 6)


@pytest.mark.parametrize("classes", [["a", "b", "c"], ["a", "b"]])
def test_a_checkpoint_with_a_head_of_its_own_keeps_it_or_gets_a_new_one_and_its_delta_is_a_classifiers(classes, tmp_path):
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, num_labels=3)).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    model, _, head = pretrained.load_classifier(str(tmp_path / "base"), classes)
    assert head == ([] if len(classes) == 3 else ["classifier.bias", "classifier.weight"])  # 3 outputs: the checkpoint's
    flat = FlatBiases(model, select_biases(model, "all", head))
    with torch.no_grad():
        flat.values.add_(0.1)
    save_delta(str(tmp_path / "delta.safetensors"), model, flat, base_model=str(tmp_path / "base"), added=[], head=head,
               task="classify", classes=classes)
    metadata = read_delta(str(tmp_path / "delta.safetensors"))[1]
    assert metadata["format"] == "bitfit-delta/3" and json.loads(metadata["classes"]) == classes


@pytest.mark.slow
def test_a_csv_regression_label_is_its_cells_number(folders, tmp_path):
    rows = "".join(f"row {i},{i % 5 + 0.5}\n" for i in range(24))
    (tmp_path / "data.csv").write_text("text,label\n" + rows)
    out = tmp_path / "run"
    assert train.main(["--task", "regress", "--model", folders["bert"], "--data", str(tmp_path / "data.csv"),
                       "--eval-data", "none", "--out-dir", str(out)]) == 0
    assert json.loads(read_delta(str(out / "delta.safetensors"))[1]["classes"]) == []


# --- the second hostile round ------------------------------------------------------------------------

@pytest.mark.slow
def test_rows_longer_than_the_encoders_positions_are_cut_to_them_in_training_and_in_classify(folders, tmp_path, capsys):
    from bitfit.infer import classify

    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * 2000, "label": i % 2}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    assert train.main(["--task", "classify", "--model", folders["bert"], "--data", str(data), "--eval-data", str(data),
                       "--max-len", "600", "--out-dir", str(out)]) == 0  # tiny BERT: 130 positions
    assert "--max-len 600 is past the encoder's 130 positions: rows are cut at 130 tokens" in capsys.readouterr().out
    assert classify.main(["--delta", str(out), "--text", "word " * 2000]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("label", ["1e300", "1" + "0" * 400, "-2e15"])
def test_a_regression_target_too_large_for_float32_is_refused_before_the_model_loads(label, folders, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "a", "label": 1.5}) + "\n" + '{"text": "b", "label": ' + label + "}\n")
    assert train.main(["--task", "regress", "--model", str(tmp_path / "nowhere"), "--data", str(data),
                       "--eval-data", "none", "--out-dir", str(tmp_path / "run")]) == 2  # the data first: no model needed
    assert "data.jsonl line 2: the label is " in (last := last_error(capsys)) and "not a finite number of at most 1e+15" in last


def edited_delta(folders, tmp_path, edit, digest: bool = True) -> str:
    """A classifier delta of the tiny BERT, then `edit(tensors, metadata)` applied to it on the disk, its digest
    made anew (`digest`; as by someone who knows how: the delta's other checks must catch what is wrong) or
    left as bitfit wrote it."""
    from safetensors.torch import load_file, save_file

    from bitfit.model.delta import content_digest

    model, flat, added, head = tuned(folders["bert"], ["no", "yes"])
    path = str(tmp_path / "delta.safetensors")
    save_delta(path, model, flat, base_model=folders["bert"], added=added, head=head, task="classify", classes=["no", "yes"])
    with safe_open(path, "pt") as file:
        metadata = file.metadata()
    tensors = load_file(path)
    edit(tensors, metadata)
    if digest:
        metadata["digest"] = content_digest(tensors, metadata)
    save_file(tensors, path, metadata=metadata)
    return path


@pytest.mark.parametrize("edit", [lambda t, m: m.update(classes='["yes", "no"]'),
                                  lambda t, m: t["classifier.bias"].add_(1.0),
                                  lambda t, m: m.update(selection='reduced')])
def test_a_classifier_delta_changed_after_it_was_written_is_refused_by_its_digest(edit, folders, tmp_path, capsys):
    from bitfit.infer import classify

    path = edited_delta(folders, tmp_path, edit, digest=False)
    assert classify.main(["--delta", path, "--text", "hi"]) == 2
    assert "its contents do not match its digest: it was changed after bitfit wrote it" in last_error(capsys)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t, m: m.update(classes='["a"]'), "its head gives 2 outputs, and it names 1 classes"),
    (lambda t, m: m.update(classes='["a", "b", "c"]'), "its head gives 2 outputs, and it names 3 classes"),
    (lambda t, m: m.update(classes='["a", "a"]'), "name one class twice"),
    (lambda t, m: t.update({"classifier.weight": torch.zeros(2, 33)}), "its head does not fit this base"),
    (lambda t, m: [t.pop(name) for name in list(t) if not name.startswith("classifier")], "it holds no biases, only a head"),
    (lambda t, m: m.update(classes="[" * 100000 + "]" * 100000), "classes must be a JSON list of names"),
    (lambda t, m: m.update(added_biases="[" * 100000 + "]" * 100000), "added_biases must be a JSON list"),
])
def test_a_classifier_delta_whose_head_and_classes_disagree_is_one_error_line(edit, message, folders, tmp_path, capsys):
    from bitfit.infer import classify

    path = edited_delta(folders, tmp_path, edit)
    assert classify.main(["--delta", path, "--text", "hi"]) == 2
    assert message in last_error(capsys)


def test_a_labelled_texts_file_with_a_label_the_delta_has_no_class_for_is_one_error_line(folders, tmp_path, capsys):
    from bitfit.infer import classify

    path = edited_delta(folders, tmp_path, lambda t, m: None)
    (tmp_path / "texts.jsonl").write_text(json.dumps({"text": "a", "label": "yes"}) + "\n" + json.dumps({"text": "b", "label": "meh"}) + "\n")
    assert classify.main(["--delta", path, "--texts-file", str(tmp_path / "texts.jsonl")]) == 2
    assert "texts.jsonl line 2: label 'meh' is not one of" in last_error(capsys)


# --- the third hostile round: GLUE's data as GLUE means it, the classifier's edges --------------------

def rows_and_places(*rows: dict) -> tuple[list[dict], list[str]]:
    return list(rows), [f"data.jsonl line {n}" for n in range(1, len(rows) + 1)]


def test_a_label_is_read_as_what_it_says_so_its_spellings_are_one_class():
    from bitfit.data.labelled import check_rows

    spellings = rows_and_places(*({"text": f"t{i}", "label": label} for i, label in enumerate([" 1", "1", "1.0", 1.0, 1, "0", 0.0])))
    assert check_rows(spellings, None, "classify") == [0, 1]
    assert check_rows(rows_and_places({"text": "a", "label": "pos "}, {"text": "b", "label": " neg"}), None, "classify") == ["neg", "pos"]


def test_int_labels_keep_their_own_ids_and_names_without_ids_are_sorted():
    from bitfit.data.labelled import check_rows

    assert check_rows(rows_and_places({"text": "a", "label": 2}, {"text": "b", "label": 0}), None, "classify") == [0, 1, 2]
    assert check_rows(rows_and_places({"text": "a", "label": "zebra"}, {"text": "b", "label": "ant"}), None, "classify") == ["ant", "zebra"]


@pytest.mark.parametrize("names", [["not_equivalent", "equivalent"], ["2", "1"]], ids=["MRPC", "digits"])
def test_a_classlabel_columns_own_order_is_the_classes_order(names, tmp_path):
    import datasets

    from bitfit.data.labelled import check_rows
    from bitfit.data.sources import declared_classes, load_records

    features = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=names)})
    rows = {"sentence1": ["a", "b", "c"], "sentence2": ["x", "y", "z"], "label": [1, 0, 1]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(tmp_path / "mrpc"))
    declared = declared_classes(str(tmp_path / "mrpc"))
    assert declared == names  # class 1 is MRPC's "equivalent": the class GLUE's F1 is of
    train_rows = load_records(str(tmp_path / "mrpc"))
    assert check_rows(train_rows, None, "classify", declared) == names
    examples = encode_labelled(*train_rows, tiny_tokenizer(), 16, "classify", names, progress=False)
    assert [example["label"] for example in examples] == rows["label"]  # each row keeps the dataset's id


def test_a_saved_dataset_dict_as_eval_data_needs_its_split_named(tmp_path):
    import datasets

    from bitfit.run.config import TrainConfig

    one = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    datasets.DatasetDict({"train": one, "validation": one}).save_to_disk(str(tmp_path / "glue"))
    with pytest.raises(BitfitError, match=r"give --eval-split for a saved DatasetDict \(its splits: train, validation\)"):
        TrainConfig(task="classify", data=str(tmp_path / "glue"), split="train", eval_data=str(tmp_path / "glue"))
    assert TrainConfig(task="classify", data=str(tmp_path / "glue"), eval_data=str(tmp_path / "glue"),
                       eval_split="validation").eval_split == "validation"


@pytest.mark.parametrize(("train_rows", "held_out", "message"), [
    ([{"question": "q", "sentence": "s", "label": 0}, {"sentence": "s2", "label": 1}, {"question": "q3", "sentence": "s", "label": 1}],
     None, r"training data: data.jsonl line 2: a single text, where the other rows are pairs"),
    ([{"text": "a", "label": 0}, {"text": "b", "label": 1}], [{"sentence1": "a", "sentence2": "b", "label": 0}],
     r"evaluation data: eval.jsonl line 1: a pair of texts, where the training data's rows are single texts"),
])
def test_a_data_set_is_all_pairs_or_all_single_texts_and_a_row_that_breaks_it_is_refused(train_rows, held_out, message):
    from bitfit.data.labelled import check_rows

    places = [f"eval.jsonl line {n}" for n in range(1, len(held_out or []) + 1)]
    with pytest.raises(BitfitError, match=message):
        check_rows(rows_and_places(*train_rows), (held_out, places) if held_out else None, "classify")


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_a_max_len_that_leaves_no_room_beside_the_special_tokens_is_refused(kind, folders):
    from bitfit.data.labelled import tokenize

    tokenizer = pretrained.load_classifier(folders[kind], ["a", "b"])[1]
    pair = tokenizer.num_special_tokens_to_add(pair=True)
    with pytest.raises(BitfitError, match=rf"--max-len {pair + 1} leaves no room for text: the tokenizer adds {pair} special"):
        tokenize(tokenizer, [("a long text " * 50, "another one " * 50)], pair + 1)
    cut = tokenize(tokenizer, [("a long text " * 50, "another one " * 50), ("one text " * 50,)], pair + 2)
    assert [len(row["input_ids"]) for row in cut] == [pair + 2, pair + 2]


@pytest.mark.slow
def test_a_max_len_below_the_special_tokens_is_one_error_line_in_training_and_in_classify(folders, tmp_path, capsys):
    from bitfit.infer import classify

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"sentence1": "word " * 700, "sentence2": "w", "label": i % 2}) + "\n" for i in range(8)))
    # A pair needs a token of each text beside the special tokens: 2 at least, whatever the tokenizer adds.
    assert train.main(["--task", "classify", "--model", folders["bert"], "--data", str(data), "--eval-data", "none",
                       "--max-len", "1", "--out-dir", str(tmp_path / "run")]) == 2
    assert "--max-len 1 leaves no room for text" in last_error(capsys) and not (tmp_path / "run").exists()
    path = edited_delta(folders, tmp_path, lambda t, m: None)
    (tmp_path / "pairs.csv").write_text("sentence1,sentence2\n" + "word " * 700 + ",w\n")
    assert classify.main(["--delta", path, "--texts-file", str(tmp_path / "pairs.csv"), "--max-len", "1"]) == 2
    assert "--max-len 1 leaves no room for text" in last_error(capsys)


def test_only_what_max_len_holds_of_a_huge_text_is_tokenized_and_the_ids_are_the_same(folders):
    from bitfit.data.labelled import tokenize

    tokenizer = pretrained.load_classifier(folders["bert"], ["a", "b"])[1]
    seen = []

    class Watched:  # the tokenizer, noting how long a text it is given
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *texts, **kwargs):
            seen.extend(len(text) for column in texts if column is not None for text in ([column] if isinstance(column, str) else column))
            return tokenizer(*texts, **kwargs)

    huge = "a sentence of a few words. " * 350_000  # 9.5 MB
    assert tokenize(Watched(), [(huge,)], 64) == tokenize(tokenizer, [(huge[:100_000],)], 64)
    assert max(seen) < 10_000  # never the 9.5 MB text: its first 64 tokens need a few hundred characters
    seen.clear()  # one unbroken 10 MB "word", a single [UNK] however much of it is read: never read whole
    assert tokenize(Watched(), [("x" * 10_000_000,)], 64) == tokenize(tokenizer, [("x" * 10_000,)], 64)
    assert max(seen) < 100_000


def test_classify_reads_glue_test_rows_marked_minus_one_or_null_as_unlabelled(folders, tmp_path, capsys):
    from bitfit.infer import classify

    path = edited_delta(folders, tmp_path, lambda t, m: None)
    rows = [{"text": "a", "label": -1}, {"text": "b", "label": "-1"}, {"text": "c", "label": None}, {"text": "d"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert classify.main(["--delta", path, "--texts-file", str(tmp_path / "test.jsonl")]) == 0
    said = capsys.readouterr().out
    assert said.count("TUNED: ") == 4 and "[right]" not in said and "[wrong]" not in said and "correct:" not in said


def test_classify_marks_a_label_spelt_otherwise_as_the_class_it_names(folders, tmp_path, capsys):
    from bitfit.infer import classify

    model, flat, added, head = tuned(folders["bert"], ["0", "1"])
    save_delta(str(tmp_path / "delta.safetensors"), model, flat, base_model=folders["bert"], added=added, head=head,
               task="classify", classes=["0", "1"])
    (tmp_path / "texts.csv").write_text("text,label\na, 1\nb,0.0\n")
    assert classify.main(["--delta", str(tmp_path / "delta.safetensors"), "--texts-file", str(tmp_path / "texts.csv")]) == 0
    said = capsys.readouterr().out
    assert "(expected: 1)" in said and "(expected: 0)" in said  # " 1" and "0.0" read as the classes 1 and 0
    marks = __import__("re").findall(r"TUNED: (\d) \(p [01]\.\d{3}\)  \[(right|wrong)\]", said)
    assert [mark == ("right" if label == expected else "wrong") for (label, mark), expected in zip(marks, "10")] == [True] * 2
    assert f"correct: TUNED {sum(mark == 'right' for _, mark in marks)}/2" in said


def test_two_classifiers_of_one_encoder_compare_by_their_biases_whatever_their_heads(folders, tmp_path, capsys):
    from bitfit.export import inspection

    for name, classes in (("a", ["no", "yes"]), ("b", ["x", "y", "z"]), ("c", None)):
        model, flat, added, head = tuned(folders["bert"], classes, seed=len(name))
        save_delta(str(tmp_path / f"{name}.safetensors"), model, flat, base_model=folders["bert"], added=added,
                   head=head, task="classify" if classes else "regress", classes=classes)
    for other in ("b", "c"):
        assert inspection.main([str(tmp_path / "a.safetensors"), str(tmp_path / f"{other}.safetensors")]) == 0
        said = capsys.readouterr().out
        assert "bias type" in said and "cosine" in said and not __import__("re").search("^classifier", said, __import__("re").M)


def test_a_peft_trained_sequence_classification_adapter_classifies_and_generate_refuses_it(folders, tmp_path, capsys):
    import generate
    from peft import BeftConfig, get_peft_model

    from bitfit.infer.mixed import classify_many

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(folders["bert"], num_labels=3)
    peft_model = get_peft_model(base, BeftConfig(target_modules=["query", "value"], task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "beft_bias" in name:
                param.copy_(torch.randn(param.shape))
    peft_model.save_pretrained(tmp_path / "theirs")
    tokenizer = pretrained.load_classifier(folders["bert"], None)[1]
    with torch.no_grad():
        expected = peft_model.eval()(**tokenizer("a text", return_tensors="pt")).logits[0].softmax(-1)
    metadata = read_delta(str(tmp_path / "theirs"))[1]
    assert metadata["task"] == "classify" and json.loads(metadata["classes"]) == ["LABEL_0", "LABEL_1", "LABEL_2"]
    model = pretrained.load_classifier(folders["bert"], ["LABEL_0", "LABEL_1", "LABEL_2"])[0]
    said = classify_many(model, tokenizer, [(("a text",), str(tmp_path / "theirs"))])[0]
    torch.testing.assert_close(torch.tensor(list(said["scores"].values())), expected, rtol=0, atol=1e-5)
    assert generate.main(["--delta", str(tmp_path / "theirs"), "--prompt", "hi"]) == 2
    assert "is a classify delta (a classifier's or regressor's)" in last_error(capsys)


def test_the_adapters_readme_names_the_classes_and_its_code_loads_the_tuned_classifier(folders, tmp_path, capsys, monkeypatch):
    import re

    from bitfit.export import adapter

    model, flat, added, head = tuned(folders["bert"], ["negative", "positive"])
    save_delta(str(tmp_path / "delta.safetensors"), model, flat, base_model=folders["bert"], added=added, head=head,
               task="classify", classes=["negative", "positive"])
    assert adapter.main(["--delta", str(tmp_path / "delta.safetensors"), "--out", str(tmp_path / "adapter")]) == 0
    assert "id2label={0: 'negative', 1: 'positive'}" in capsys.readouterr().out
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "| 0 | negative |" in card and "| 1 | positive |" in card
    monkeypatch.chdir(tmp_path / "adapter")  # the card's code loads the folder it is in
    scope = {}
    exec(re.search(r"```python\n(.*?)```", card, re.S).group(1), scope)
    ids = torch.tensor([[5, 17, 42, 9]])
    assert scope["model"].config.id2label == {0: "negative", 1: "positive"}
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_declared_class_names_that_read_as_one_label_are_refused_never_merged():
    from bitfit.data.labelled import check_rows

    rows = rows_and_places({"text": "a", "label": "01"}, {"text": "b", "label": "1"})
    with pytest.raises(BitfitError, match=r"declares the classes \['01', '1', '2'\], of which \['01', '1'\] read as one label"):
        check_rows(rows, None, "classify", ["01", "1", "2"])
    assert check_rows(rows_and_places({"text": "a", "label": "1.0"}, {"text": "b", "label": "2.0"}), None, "classify",
                      ["1.0", "2.0"]) == ["1.0", "2.0"]  # names that read as numbers, each its own


def test_a_delta_whose_head_names_a_weight_of_the_base_is_refused(folders, tmp_path, capsys):
    from bitfit.infer import classify

    def forge(tensors, metadata):  # a "head" that would overwrite a weight the base trained
        name = "bert.encoder.layer.0.attention.self.query.weight"
        tensors[name] = torch.zeros(32, 32)
        metadata["head"] = json.dumps(sorted([*json.loads(metadata["head"]), name]))

    path = edited_delta(folders, tmp_path, forge)
    assert classify.main(["--delta", path, "--text", "hi"]) == 2
    assert "its head lists bert.encoder.layer.0.attention.self.query.weight, a parameter of the model's blocks" in last_error(capsys)


def test_a_delta_and_the_adapter_exported_from_it_compare_as_one_selection(folders, tmp_path, capsys):
    from bitfit.export import adapter, inspection

    model, flat, added, head = tuned(folders["bert"], ["no", "yes"])
    save_delta(str(tmp_path / "delta.safetensors"), model, flat, base_model=folders["bert"], added=added, head=head,
               task="classify", classes=["no", "yes"])
    assert adapter.main(["--delta", str(tmp_path / "delta.safetensors"), "--out", str(tmp_path / "adapter")]) == 0
    assert inspection.main([str(tmp_path / "delta.safetensors"), str(tmp_path / "adapter")]) == 0
    rows = [line.split()[-4:] for line in capsys.readouterr().out.splitlines() if line.startswith(("query", "output"))]
    assert rows and all(difference == "0.0000" and cosine == "1.000" for _, _, difference, cosine in rows)  # one change


@pytest.mark.parametrize("label", [10_000, 10**300])
def test_an_int_label_past_the_class_limit_is_one_short_error_line(label):
    from bitfit.data.labelled import check_label

    with pytest.raises(BitfitError, match=r"data.jsonl line 3: label .* as a class id asks for that many outputs") as caught:
        check_label({"label": label}, "data.jsonl line 3", "classify")
    assert len(str(caught.value)) < 250
