"""A delta as a PEFT adapter folder, and such a folder read back as a delta.

    python -m bitfit.adapter --delta runs/<run>/delta.safetensors --out my-adapter/

PEFT (0.21+) has a tuner for exactly what BitFit trains on linear layers, BEFT: one vector per targeted
`nn.Linear`, added to its output. Adding a vector to a linear layer's output is adding it to the layer's
bias, so a delta on linear layers IS a BEFT adapter, whether bitfit added the bias (a zero base: Llama,
SmolLM2) or the layer had one (BLOOM). The folder holds what PEFT's `save_pretrained` writes:
    adapter_config.json            {"peft_type": "BEFT", "target_modules": [every module, by full name], ...}
    adapter_model.safetensors      "base_model.model.<module>.beft_bias": fp32 [1, out_features] per module
and `PeftModel.from_pretrained(base, folder)` gives the tuned model. bitfit writes it without importing
peft. The delta's base fingerprint travels in the safetensors metadata, so the folder read back as a
delta (`generate.py --delta my-adapter/`, `python -m bitfit.merge --delta my-adapter/`) is checked
against its base as the delta was; an adapter trained by PEFT itself has none, and its base is not checked.

A bias that is not on a linear layer (the LayerNorm biases BERT and BLOOM train) has no place in BEFT, and
a classifier's head is new: their modules go into PEFT's `modules_to_save`, which PEFT saves whole, as
    adapter_model.safetensors      "base_model.model.<module>.<parameter>": the tuned module's every parameter
(task_type SEQ_CLS for a classifier). Read back, those whole values become a delta again against the base
they are applied to (`check_delta`), and a whole value that is no bias must equal the base's: BitFit
never changes one. The export loads the base, applies the delta
(checked against the base's fingerprint) and refuses a tuned model whose outputs are not finite
(bitfit.finite): an adapter of a run that diverged is never written.
"""

import argparse
import json
import sys
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn
from . import models
from .cli import ArgumentParser, entry_point
from .delta import FOREIGN, FORMATS, apply_delta, head_modules, head_of, read_delta, task_of
from .errors import BitfitError
from .files import check_new_folder, parse_json, write_folder
from .finite import refuse_broken, text_probe

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX, SUFFIX = "base_model.model.", ".beft_bias"  # PEFT's names: the base model's module path, wrapped


def adapter_type(path: str | Path) -> str | None:
    """The peft_type of a PEFT adapter folder ('BEFT', 'LORA', ...), or None for any other path."""
    config = Path(path) / CONFIG
    if not config.is_file():
        return None
    try:
        kind = parse_json(config.read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def is_beft_folder(path: str | Path) -> bool:
    return adapter_type(path) == "BEFT"


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def whole_modules(model: nn.Module, tensors: dict[str, torch.Tensor], head: list[str]) -> list[str]:
    """The modules an adapter saves whole (modules_to_save): those of a bias that is not on a linear layer,
    and the head's (delta.head_modules)."""
    modules = dict(model.named_modules())
    missing = [name for name in tensors if module_of(name) not in modules]
    if missing:
        raise BitfitError(f"the base has no module for {missing[0]}: is it the base the delta was trained on?")
    whole = {module_of(name) for name in tensors
             if name not in head and not isinstance(modules[module_of(name)], nn.Linear)}
    return sorted(whole | set(head_modules(model, head)))


def adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], whole: list[str]) -> dict[str, torch.Tensor]:
    """The adapter file's tensors: a BEFT vector per linear bias of the delta, and every parameter of the
    whole modules, as the tuned `model` holds them."""
    inside = lambda name: any(name.startswith(module + ".") for module in whole)  # noqa: E731
    vectors = {PREFIX + module_of(name) + SUFFIX: tensor.reshape(1, -1).contiguous()
               for name, tensor in tensors.items() if not inside(name)}
    saved = {PREFIX + f"{module}.{name}": param.detach().cpu().contiguous().clone()
             for module in whole for name, param in model.get_submodule(module).named_parameters()}
    return {**vectors, **saved}


def export(delta_path: str, out_dir: str, model_name: str = "", trust_remote_code: bool = False,
           trust_pickle_weights: bool = False) -> Path:
    """Write the delta as a BEFT adapter folder (new or empty, written whole or not at all), once the base
    plus the delta proved to be a working model."""
    out = check_new_folder(out_dir, "--out")
    tensors, metadata = read_delta(delta_path)
    base = model_name or metadata["base_model"]
    task, classes = task_of(metadata)
    model, tokenizer = models.load_for(base, task, classes, torch.device("cpu"), torch.float32, trust_remote_code,
                                       trust_pickle_weights)
    apply_delta(model, delta_path)  # refuses a base the delta was not trained on
    refuse_broken(model, text_probe(tokenizer), delta_path)
    whole = whole_modules(model, tensors, head_of(metadata))
    adapter = adapter_tensors(model, tensors, whole)
    config = {
        "peft_type": "BEFT", "task_type": "CAUSAL_LM" if task == "lm" else "SEQ_CLS",
        "target_modules": sorted(name[len(PREFIX) : -len(SUFFIX)] for name in adapter if name.endswith(SUFFIX)),
        # PEFT loads the base by this name; the embedded default is a folder in bitfit's cache.
        "base_model_name_or_path": models.resolve(base) if base in (models.EMBEDDED, models.EMBEDDED_ENCODER) else base,
        "inference_mode": True, "init_weights": True, "modules_to_save": whole or None, "revision": None,
        "auto_mapping": None,
    }
    # The delta's metadata rides along (safetensors metadata is strings only), so the folder reads back as it.
    carried = {"format": "pt", **{f"bitfit_{key}": value for key, value in metadata.items()}}

    def fill(folder: Path) -> None:
        safetensors.torch.save_file(adapter, str(folder / WEIGHTS), metadata=carried)
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    write_folder(out, fill)
    return out


def read_beft(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A BEFT adapter folder as a delta's (tensors, metadata). bitfit's own exports carry the delta's
    metadata; an adapter trained by PEFT gets an empty fingerprint (its base cannot be checked) and
    added biases found when it is applied (the targeted layers that have none). What PEFT saved whole
    (modules_to_save) is listed as `whole` in the metadata: values, not changes (delta.check_delta)."""
    folder = Path(folder)
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as file:
            stored = file.metadata() or {}
            raw = {name: file.get_tensor(name) for name in file.keys()}
        config = parse_json((folder / CONFIG).read_text())
    except Exception as error:  # safetensors' own error types for corrupt files; OSError; bad JSON
        raise BitfitError(f"{folder} is not a readable PEFT adapter folder ({error})") from None
    odd = [name for name in raw if not name.startswith(PREFIX)]
    if odd:
        raise BitfitError(f"{folder}: {odd[0]} is neither a BEFT vector ({PREFIX}<module>{SUFFIX}) nor a parameter of "
                          "a module PEFT saves whole")
    tensors = {name.removeprefix(PREFIX).removesuffix(SUFFIX) + ".bias": tensor.reshape(-1).float()
               for name, tensor in raw.items() if name.endswith(SUFFIX)}
    whole = {name.removeprefix(PREFIX): tensor.float() for name, tensor in raw.items() if not name.endswith(SUFFIX)}
    carried = {key.removeprefix("bitfit_"): value for key, value in stored.items() if key.startswith("bitfit_")}
    metadata = carried if carried.get("format") in FORMATS else {
        "format": FOREIGN, "base_model": base if isinstance(base := config.get("base_model_name_or_path"), str) else "",
        "base_fingerprint": "",
        "added_biases": "[]", "dtype": "float32", "selection": f"the PEFT BEFT adapter {folder}"}
    head = set(head_of(metadata))
    if whole:
        metadata = {**metadata, "whole": json.dumps(sorted(set(whole) - head))}
    return {**tensors, **whole}, metadata


@entry_point
def main(argv: list[str] | None = None) -> int:
    cli = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_argument("--delta", required=True, help="a delta.safetensors written by train.py")
    cli.add_argument("--out", required=True, help="a new (or empty) folder for the PEFT adapter")
    cli.add_argument("--model", default="", help="the base model; '' means the one the delta names")
    cli.add_argument("--trust-remote-code", action="store_true", help="let transformers run code shipped with the model")
    cli.add_argument("--trust-pickle-weights", action="store_true",
                     help="load weights stored as pickle (.bin/.pt), which can run any code they contain")
    args = cli.parse_args(argv)
    check_new_folder(args.out, "--out")  # before the model is loaded: a refusal should not take a minute
    out = export(args.delta, args.out, args.model, args.trust_remote_code, args.trust_pickle_weights)
    print(f"wrote {out}: load it with PeftModel.from_pretrained(base_model, {str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
