"""A delta as a PEFT adapter folder, and such a folder read back as a delta.

    python -m bitfit.export.adapter --delta runs/<run>/delta.safetensors --out my-adapter/

PEFT (0.21+) has a tuner for exactly what BitFit trains on linear layers, BEFT: one vector per targeted
`nn.Linear`, added to its output. Adding a vector to a linear layer's output is adding it to the layer's
bias, so a delta on linear layers IS a BEFT adapter, whether bitfit added the bias (a zero base: Llama,
SmolLM2) or the layer had one (BLOOM). The folder holds what PEFT's `save_pretrained` writes:
    adapter_config.json            {"peft_type": "BEFT", "target_modules": [every module, by full name], ...}
    adapter_model.safetensors      "base_model.model.<module>.beft_bias": fp32 [1, out_features] per module
and `PeftModel.from_pretrained(base, folder)` gives the tuned model. bitfit writes it without importing
peft. The delta's base fingerprint travels in the safetensors metadata, so the folder read back as a
delta (`generate.py --delta my-adapter/`, `python -m bitfit.export.merge --delta my-adapter/`) is checked
against its base as the delta was; an adapter trained by PEFT itself has none, and its base is not checked.

A bias that is not on a linear layer (the LayerNorm biases BERT and BLOOM train) has no place in BEFT, and
a classifier's head is new: their modules go into PEFT's `modules_to_save`, which PEFT saves whole, as
    adapter_model.safetensors      "base_model.model.<module>.<parameter>": the tuned module's every parameter
(task_type SEQ_CLS for a classifier). Read back, those whole values become a delta again against the base
they are applied to (`check_delta`), and a whole value that is no bias must equal the base's: BitFit
never changes one. The export loads the base, applies the delta
(checked against the base's fingerprint) and refuses a tuned model whose outputs are not finite
(bitfit.run.finite): an adapter of a run that diverged is never written.
"""

import json
import sys
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from bitfit.cli import delta_to_folder_args, entry_point
from bitfit.core.errors import BitfitError
from bitfit.files import check_new_folder, write_folder
from bitfit.model import pretrained
from bitfit.model.delta import (
    CONFIG,
    PREFIX,
    SUFFIX,
    WEIGHTS,
    apply_delta,
    content_digest,
    head_modules,
    head_of,
    read_delta,
    task_of,
)
from bitfit.run.finite import refuse_broken, text_probe


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
    model, tokenizer = pretrained.load_for(base, task, classes, torch.device("cpu"), torch.float32, trust_remote_code,
                                       trust_pickle_weights)
    apply_delta(model, delta_path)  # refuses a base the delta was not trained on
    refuse_broken(model, text_probe(tokenizer), delta_path)
    whole = whole_modules(model, tensors, head_of(metadata))
    adapter = adapter_tensors(model, tensors, whole)
    config = {
        "peft_type": "BEFT", "task_type": "CAUSAL_LM" if task == "lm" else "SEQ_CLS",
        "target_modules": sorted(name[len(PREFIX) : -len(SUFFIX)] for name in adapter if name.endswith(SUFFIX)),
        # PEFT loads the base by this name; the embedded default is a folder in bitfit's cache.
        "base_model_name_or_path": pretrained.resolve(base) if base in (pretrained.EMBEDDED, pretrained.EMBEDDED_ENCODER) else base,
        "inference_mode": True, "init_weights": True, "modules_to_save": whole or None, "revision": None,
        "auto_mapping": None,
    }
    # The delta's metadata rides along (safetensors metadata is strings only), so the folder reads back as it,
    # with a digest of this file's own tensors (the delta's is of the delta's).
    own = {key: value for key, value in metadata.items() if key != "digest"}
    own["digest"] = content_digest(adapter, own)
    carried = {"format": "pt", **{f"bitfit_{key}": value for key, value in own.items()}}

    def fill(folder: Path) -> None:
        safetensors.torch.save_file(adapter, str(folder / WEIGHTS), metadata=carried)
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (folder / "README.md").write_text(model_card(config["base_model_name_or_path"], task, classes))

    write_folder(out, fill)
    return out


def loading(base: str, task: str, classes: list[str] | None, folder: str) -> str:
    """The Python that loads the adapter onto its base with PEFT: a classifier's base with the delta's classes."""
    if task == "lm":
        return (f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {folder!r})")
    labels = (f"num_labels={len(classes)}, id2label={dict(enumerate(classes))!r}, "
              f"label2id={ {name: i for i, name in enumerate(classes)}!r}" if classes else
              "num_labels=1, problem_type='regression'")
    return f"PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained({base!r}, {labels}), {folder!r})"


def model_card(base: str, task: str, classes: list[str] | None) -> str:
    """The adapter folder's README.md (where PEFT's own save_pretrained writes a model card): what it is, a
    classifier's classes in the order of its outputs (PEFT's files carry no label names), and how to load it."""
    kind = {"lm": "a causal LM", "classify": "a classifier", "regress": "a regressor"}[task]
    lines = [f"# A BitFit adapter of {base}", "",
             f"Trained with bitfit: only the biases of {kind} changed, stored as a PEFT BEFT adapter"
             + (" with its head saved whole." if task != "lm" else "."), ""]
    if classes:
        lines += ["The head's outputs, in order (id2label):", "", "| id | label |", "| --- | --- |",
                  *(f"| {i} | {name} |" for i, name in enumerate(classes)), ""]
    elif task == "regress":
        lines += ["The head has one output: the predicted number.", ""]
    lines += ["```python", "from peft import PeftModel",
              f"from transformers import {'AutoModelForCausalLM' if task == 'lm' else 'AutoModelForSequenceClassification'}",
              "", f"model = {loading(base, task, classes, '.')}", "```", ""]
    return "\n".join(lines)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = delta_to_folder_args(argv, __doc__.splitlines()[0], "a new (or empty) folder for the PEFT adapter")
    out = export(args.delta, args.out, args.model, args.trust_remote_code, args.trust_pickle_weights)
    config = json.loads((out / CONFIG).read_text())
    _, metadata = read_delta(str(out))
    print(f"wrote {out}: load it with {loading(config['base_model_name_or_path'], *task_of(metadata), str(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
