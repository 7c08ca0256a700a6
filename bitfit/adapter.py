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

A bias that is not on a linear layer (LayerNorm biases: BLOOM trains them) has no place in BEFT: the
export is refused, naming them, never dropped silently. The export loads the base, applies the delta
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
from .cli import ArgumentParser
from .delta import FOREIGN, FORMATS, apply_delta, read_delta
from .errors import BitfitError
from .files import check_new_folder, write_folder
from .finite import nonfinite_outputs, text_probe

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX, SUFFIX = "base_model.model.", ".beft_bias"  # PEFT's names: the base model's module path, wrapped


def adapter_type(path: str | Path) -> str | None:
    """The peft_type of a PEFT adapter folder ('BEFT', 'LORA', ...), or None for any other path."""
    config = Path(path) / CONFIG
    if not config.is_file():
        return None
    try:
        kind = json.loads(config.read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def is_beft_folder(path: str | Path) -> bool:
    return adapter_type(path) == "BEFT"


def linear_modules(model: nn.Module, model_name: str, names: list[str]) -> dict[str, nn.Module]:
    """The modules of `model` that hold the biases `names` (a bias bitfit added sits on a linear layer
    that has none)."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name.removesuffix(".bias") not in modules]
    if missing:
        raise BitfitError(f"the base {model_name!r} has no module for {missing[0]}: is it the base the delta was trained on?")
    return {name: modules[name.removesuffix(".bias")] for name in names}


def to_beft(tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The adapter's tensors for a delta's, or a BitfitError naming every bias BEFT cannot hold."""
    outside = sorted(name for name, module in modules.items() if not isinstance(module, nn.Linear))
    if outside:
        raise BitfitError(
            f"{len(outside)} of the delta's biases are not on a linear layer (e.g. {', '.join(outside[:3])}), and PEFT's "
            "BEFT adds vectors to nn.Linear outputs only: use `python -m bitfit.merge` for a standalone model, or train "
            "with a --biases pattern that leaves them out (BLOOM: --biases 'query_key_value|dense')")
    return {PREFIX + name.removesuffix(".bias") + SUFFIX: tensor.reshape(1, -1).contiguous() for name, tensor in tensors.items()}


def export(delta_path: str, out_dir: str, model_name: str = "", trust_remote_code: bool = False,
           trust_pickle_weights: bool = False) -> Path:
    """Write the delta as a BEFT adapter folder (new or empty, written whole or not at all), once the base
    plus the delta proved to be a working model."""
    out = check_new_folder(out_dir, "--out")
    tensors, metadata = read_delta(delta_path)
    base = model_name or metadata["base_model"]
    model, tokenizer = models.load(base, torch.device("cpu"), torch.float32, trust_remote_code, trust_pickle_weights)
    adapter = to_beft(tensors, linear_modules(model, base, list(tensors)))
    apply_delta(model, delta_path)  # refuses a base the delta was not trained on
    if problem := nonfinite_outputs(model, text_probe(tokenizer)):
        raise BitfitError(f"the model tuned by {delta_path} is broken: {problem}; refusing to export it (the run that "
                          "wrote the delta diverged)")
    config = {
        "peft_type": "BEFT", "task_type": "CAUSAL_LM", "target_modules": sorted(n.removesuffix(".bias") for n in tensors),
        # PEFT loads the base by this name; the embedded default is a folder in bitfit's cache.
        "base_model_name_or_path": models.resolve(base) if base == models.EMBEDDED else base,
        "inference_mode": True, "init_weights": True, "modules_to_save": None, "revision": None, "auto_mapping": None,
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
    added biases found when it is applied (the targeted layers that have none)."""
    folder = Path(folder)
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as file:
            stored = file.metadata() or {}
            raw = {name: file.get_tensor(name) for name in file.keys()}
        config = json.loads((folder / CONFIG).read_text())
    except Exception as error:  # safetensors' own error types for corrupt files; OSError; bad JSON
        raise BitfitError(f"{folder} is not a readable PEFT adapter folder ({error})") from None
    odd = [name for name in raw if not (name.startswith(PREFIX) and name.endswith(SUFFIX))]
    if odd:
        raise BitfitError(f"{folder}: {odd[0]} is not a BEFT vector ({PREFIX}<module>{SUFFIX})")
    tensors = {name.removeprefix(PREFIX).removesuffix(SUFFIX) + ".bias": tensor.reshape(-1).float()
               for name, tensor in raw.items()}
    carried = {key.removeprefix("bitfit_"): value for key, value in stored.items() if key.startswith("bitfit_")}
    metadata = carried if carried.get("format") in FORMATS else {
        "format": FOREIGN, "base_model": config.get("base_model_name_or_path") or "", "base_fingerprint": "",
        "added_biases": "[]", "dtype": "float32", "selection": f"the PEFT BEFT adapter {folder}"}
    return tensors, metadata


def main(argv: list[str] | None = None) -> int:
    cli = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_argument("--delta", required=True, help="a delta.safetensors written by train.py")
    cli.add_argument("--out", required=True, help="a new (or empty) folder for the PEFT adapter")
    cli.add_argument("--model", default="", help="the base model; '' means the one the delta names")
    cli.add_argument("--trust-remote-code", action="store_true", help="let transformers run code shipped with the model")
    cli.add_argument("--trust-pickle-weights", action="store_true",
                     help="load weights stored as pickle (.bin/.pt), which can run any code they contain")
    try:
        args = cli.parse_args(argv)
        check_new_folder(args.out, "--out")  # before the model is loaded: a refusal should not take a minute
        out = export(args.delta, args.out, args.model, args.trust_remote_code, args.trust_pickle_weights)
    except BitfitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}: load it with PeftModel.from_pretrained(base_model, {str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
