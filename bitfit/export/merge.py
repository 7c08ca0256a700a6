"""Fold a delta into its base and write a standard Hugging Face model folder.

    python -m bitfit.export.merge --delta runs/<run>/delta.safetensors --out merged/

The folder loads with plain `AutoModelForCausalLM.from_pretrained(folder)` (a classifier's or regressor's:
`AutoModelForSequenceClassification`, with its id2label), no bitfit code, and gives the tuned model's logits. Biases bitfit added to a bias-free base must be expressible by the architecture's
own config (Llama: `attention_bias`, `mlp_bias`); where they are not (Mistral, say), the merge is refused
and the delta stays the way to use the tuned model. --out must be a new or empty folder: a merge never
writes over a base model's folder, a run folder or anything else already there.
"""

import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

from bitfit.cli import delta_to_folder_args, entry_point
from bitfit.core.biases import add_zero_bias, is_bias
from bitfit.core.errors import BitfitError
from bitfit.files import check_new_folder, write_folder
from bitfit.model import pretrained
from bitfit.model.delta import apply_delta, read_delta, task_of
from bitfit.run.finite import refuse_broken, text_probe

BIAS_FLAGS = ("attention_bias", "mlp_bias")  # config switches that give Llama-family layers their biases


def standard_config(model: nn.Module, added: list[str]) -> tuple[object, list[str]]:
    """A config whose architecture has a parameter for every bias bitfit added to `model`.

    Returns it with the names of the biases that architecture has and the model lacks (a 'reduced' run
    adds only some): the merge gives them zeros, which change nothing.
    """
    if not added:
        return model.config, []
    config = copy.deepcopy(model.config)
    for flag in BIAS_FLAGS:
        if isinstance(getattr(config, flag, None), bool):
            setattr(config, flag, True)
    with torch.device("meta"):
        expected = set(pretrained.auto_class(model).from_config(config).state_dict())
    inexpressible = sorted(set(added) - expected)
    if inexpressible:
        raise BitfitError(f"a {config.model_type!r} model has no place for the biases bitfit added (e.g. {inexpressible[0]}): "
                          f"its config has no {' / '.join(BIAS_FLAGS)} switch for them, so no standard folder can be "
                          "written; use the delta with its base model instead")
    extra = sorted(expected - set(model.state_dict()))
    if any(not is_bias(name) for name in extra):
        raise BitfitError(f"with its biases switched on, a {config.model_type!r} model also expects {extra[:3]}, "
                          "which are not biases; refusing to merge")
    return config, extra


def probe_of(tokenizer, vocab_size: int) -> dict[str, torch.Tensor]:
    """What the merge checks the model on: everyday text (bitfit.run.finite), or fixed token ids without a tokenizer."""
    if tokenizer is not None:
        return text_probe(tokenizer)
    ids = torch.arange(1, 17).unsqueeze(0) % vocab_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model: nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for the probe, on the CPU."""
    model.eval()
    with torch.no_grad():
        return model(**{key: tensor.to(model.device) for key, tensor in probe.items()}).logits.cpu()


def merge(model: nn.Module, delta_path: str, out_dir: str, tokenizer=None) -> Path:
    """Apply the delta to the base `model` (in place), make its architecture standard, save it, and
    check that the saved folder reloads to the same logits.

    `out_dir` must be a new folder or an empty one. The model is written into a hidden folder beside it
    and renamed to `out_dir` only once it has passed the check: a failure leaves nothing behind.
    """
    out = check_new_folder(out_dir, "--out")
    metadata = apply_delta(model, delta_path)
    config, zero_biases = standard_config(model, json.loads(metadata["added_biases"]))
    modules = dict(model.named_modules())
    for name in zero_biases:
        add_zero_bias(modules[name.rsplit(".", 1)[0]])
    model.config = config
    probe = probe_of(tokenizer, config.vocab_size)
    refuse_broken(model, probe, delta_path)
    expected = logits(model, probe)

    def save_and_check(staging: Path) -> None:
        model.save_pretrained(staging)  # write_folder gives the files their permissions and flushes them
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        # The promise is "loads with plain transformers to the same model": check it before saying so.
        reloaded = pretrained.auto_class(model).from_pretrained(staging, dtype=next(model.parameters()).dtype)
        difference = (logits(reloaded, probe) - expected).abs().max().item()
        if not difference <= 1e-6:  # not `difference > 1e-6`: NaN > 1e-6 is False, and NaN must fail
            raise BitfitError(f"the merged model does not reproduce the tuned logits (max difference {difference:.2e}); "
                              f"nothing was written to {out}")

    write_folder(out, save_and_check)
    return out


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = delta_to_folder_args(argv, __doc__.splitlines()[0],
                                "a new (or empty) folder to write the merged model and its tokenizer to")
    metadata = read_delta(args.delta)[1]
    model, tokenizer = pretrained.load_for(args.model or metadata["base_model"], *task_of(metadata), torch.device("cpu"),
                                       torch.float32, args.trust_remote_code, args.trust_pickle_weights)
    out = merge(model, args.delta, args.out, tokenizer)
    print(f"wrote {out}: load it with {pretrained.auto_class(model).__name__}.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
