"""The delta file: only what BitFit changed, in kilobytes to megabytes instead of a multi-GB model.

A safetensors file with one 1-D fp32 tensor per trained bias, named by its parameter name, holding
`tuned - base`, every value finite. Its metadata (all strings, as safetensors requires):
    format            "bitfit-delta/2"
    base_model        the name or path the base was loaded from
    base_fingerprint  a hash of every value of the base's parameters (see `fingerprint`)
    added_biases      JSON list of the biases bitfit added to a bias-free base (zero in the base)
    dtype             dtype of the delta tensors ("float32")
    selection         which biases were selected (--biases: "all", "reduced", bias groups or a pattern)
    digest            a hash of every tensor and every other metadata entry (`content_digest`): a file
                      changed after bitfit wrote it (a value, a class's name or place) is refused
A file without a digest (written before bitfit wrote one) is read unchecked on that point.
"bitfit-delta/1" files are the same but for a fingerprint of 1,024 sampled values per tensor; they are
still read and applied.

"bitfit-delta/3" is a classifier's or a regressor's delta (--task classify / regress): the same, plus the
parameters the base checkpoint does not hold (the head), stored whole (their values, not a change: a
fresh base draws them at random), and three more keys:
    task              "classify" or "regress"
    classes           JSON list of the class names, class i at index i (empty for regress)
    head              JSON list of the parameters stored whole
The base is fingerprinted without them, and a base is given them (copied, not added) when applied.
"""

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from bitfit.core.biases import add_zero_bias, block_lists, is_bias
from bitfit.core.errors import BitfitError
from bitfit.core.flat import FlatBiases
from bitfit.files import parse_json, write_atomically
from bitfit.model.pretrained import whole

FORMAT = "bitfit-delta/2"
FORMAT_3 = "bitfit-delta/3"  # with a head: a classifier's or a regressor's delta
FOREIGN = "peft-beft"  # read from a BEFT adapter folder that bitfit did not write (bitfit.export.adapter)
FORMAT_1 = "bitfit-delta/1"  # fingerprinted 1,024 values per tensor: a base changed elsewhere passed
FORMATS = (FORMAT_3, FORMAT, FORMAT_1)  # every format bitfit writes or reads
SAMPLES_1 = 1024
METADATA = ("format", "base_model", "base_fingerprint", "added_biases", "dtype", "selection")
METADATA_3 = ("task", "classes", "head")
CHUNK = 2**24  # values rounded and hashed at a time: a 32 MiB bf16 copy, whatever the tensor's size

NEVER_MOVED = ("the delta is all zeros: no bias moved from its base value, so there is nothing to save. Either "
               "every gradient was zero (no label token reached the loss) or no update reached the biases: a "
               "learning rate too small to change an fp32 bias, or, in a loop of your own, clearing gradients "
               "with optimizer.zero_grad(), which sets the flat gradient to None so the optimizer steps nothing "
               "(clear them with FlatBiases.zero_grad())")


def fingerprint(named_params: Iterable[tuple[str, torch.Tensor]], exclude: Iterable[str] = (),
                samples: int | None = None) -> str:
    """A short hash that tells one base model from another, from its parameters.

    Hashes each parameter's name, shape and every value rounded to bf16, so the same checkpoint stored
    in fp32 or bf16 gives the same fingerprint, while another checkpoint, one changed in a single value,
    or one whose biases already hold a delta does not. `exclude` skips the biases bitfit added (a fresh
    base does not have them). Hashing the bytes of bf16 copies, 2**24 values at a time, keeps it fast:
    134.5M random fp32 values in SmolLM2-135M's 271 tensor shapes took 0.25 s on a 2-core Xeon.

    `samples`: hash only that many evenly spaced values per tensor, as bitfit-delta/1 files did (1,024);
    used only to check the base of such a file.
    """
    skip = set(exclude)
    digest = hashlib.sha256()
    for name, tensor in sorted(named_params, key=lambda item: item[0]):
        if name in skip:
            continue
        values = whole(tensor).detach().reshape(-1)  # a sharded weight is gathered, one tensor at a time
        if samples is not None:
            count = min(values.numel(), samples)
            # Integer arithmetic: float positions round past the end of tensors over 2**24 values.
            values = values[torch.arange(count, device=values.device) * (values.numel() - 1) // max(count - 1, 1)]
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        for start in range(0, values.numel(), CHUNK):
            digest.update(values[start : start + CHUNK].to(torch.bfloat16).view(torch.int16).cpu().numpy())
    return digest.hexdigest()[:16]


def content_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """16 hex digits of the SHA-256 of every tensor (its name, dtype, shape and bytes) and every metadata
    entry but the digest itself: whatever a prediction depends on (a value, the head, which class is which)
    cannot change without changing it."""
    digest = hashlib.sha256()
    for key in sorted(metadata):
        if key != "digest":
            digest.update(json.dumps([key, metadata[key]]).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def base_fingerprint(model: nn.Module, flat: FlatBiases, added: list[str], head: list[str] = ()) -> str:
    """The fingerprint of the model before training: its trained biases taken at their base values, the
    biases bitfit added and the new head left out (neither is the checkpoint's)."""
    base = flat.unflatten(flat.base)
    return fingerprint(((name, base.get(name, param)) for name, param in model.named_parameters()),
                       exclude=[*added, *head])


def save_delta(path: str, model: nn.Module, flat: FlatBiases, *, base_model: str, added: list[str], selection: str = "all",
               fingerprint_of_base: str | None = None, head: list[str] = (), task: str = "lm",
               classes: list[str] | None = None) -> None:
    """Write `tuned - base` of every trained bias, with what is needed to check the base on load; with a
    `head` (a classifier's new parameters, task 'classify' or 'regress'), those whole: format 3.

    `fingerprint_of_base`: the base's fingerprint when it is known already (train.py takes it before
    training; under sharded weights only all processes together can compute it), else computed here.

    Refuses a delta with a NaN or inf (never saved as if it were good) and a delta of zeros (a loop
    that trained nothing). Written atomically: a crash or a full disk leaves any earlier file at `path`
    as it was and no half-written one.
    """
    values = flat.unflatten(flat.values)  # the head is stored as it is, the biases as their change
    tensors = {name: (values[name] if name in head else t).detach().cpu().clone()
               for name, t in flat.unflatten(flat.values - flat.base).items()}
    non_finite = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if non_finite:
        raise BitfitError(f"refusing to save a delta with NaN or inf values ({len(non_finite)} of {len(tensors)} "
                          f"tensors, the first {non_finite[0]}): the tuned model would be unusable")
    if not any(t.any() for name, t in tensors.items() if name not in head):
        raise BitfitError(NEVER_MOVED)
    metadata = {
        "format": FORMAT_3 if task != "lm" else FORMAT,
        "base_model": base_model,
        "base_fingerprint": fingerprint_of_base or base_fingerprint(model, flat, added, head),
        "added_biases": json.dumps(added),
        "dtype": "float32",
        "selection": selection,
        **({"task": task, "classes": json.dumps(classes or []), "head": json.dumps(sorted(head))} if task != "lm" else {}),
    }
    metadata["digest"] = content_digest(tensors, metadata)
    write_atomically(Path(path), safetensors.torch.save(tensors, metadata=metadata))


def metadata_problem(metadata: dict[str, str]) -> str | None:
    """What is wrong with a delta's metadata, or None. The format was checked already."""
    missing = [key for key in (*METADATA, *(METADATA_3 if metadata["format"] == FORMAT_3 else ())) if key not in metadata]
    if missing:
        return f"its metadata lacks {', '.join(missing)}"
    if (metadata["format"] == FORMAT_3 or metadata["format"] == FOREIGN and "task" in metadata) and (
            problem := head_problem(metadata)):
        return problem
    if metadata["format"] not in (FORMAT_3, FOREIGN) and (extra := [key for key in METADATA_3 if key in metadata]):
        return f"its metadata has {', '.join(extra)}, which only a {FORMAT_3} delta has"
    if "whole" in metadata and not _names(metadata["whole"]):
        return f"whole must be a JSON list of names, not {metadata['whole'][:80]!r}"
    if metadata["format"] == FOREIGN:  # an adapter PEFT trained: no fingerprint, its added biases found on applying
        return None
    try:
        added = parse_json(metadata["added_biases"])
    except ValueError:  # not JSON, or nested past what Python's reader can
        added = None
    if not isinstance(added, list) or not all(isinstance(name, str) and is_bias(name) for name in added):
        return f"added_biases must be a JSON list of bias names, not {metadata['added_biases'][:80]!r}"
    if not re.fullmatch(r"[0-9a-f]{16}", metadata["base_fingerprint"]):
        return f"base_fingerprint must be 16 hex digits, not {metadata['base_fingerprint'][:80]!r}"
    if metadata["dtype"] != "float32":
        return f"dtype must be 'float32', not {metadata['dtype'][:80]!r}"
    if not metadata["base_model"]:
        return "base_model is empty: the delta does not say which model it was trained on"
    return None


def head_problem(metadata: dict[str, str]) -> str | None:
    """What is wrong with a format-3 delta's task, classes and head, or None."""
    if metadata["task"] not in ("classify", "regress"):
        return f"task must be 'classify' or 'regress', not {metadata['task'][:40]!r}"
    for key in ("classes", "head"):
        if not _names(metadata[key]):
            return f"{key} must be a JSON list of names, not {metadata[key][:80]!r}"
    classes = json.loads(metadata["classes"])
    if (metadata["task"] == "classify") != bool(classes):
        return "a classifier's delta names its classes, a regressor's none"
    if len(set(classes)) != len(classes):
        return f"its classes {classes} name one class twice"
    return None


def _names(text: str) -> bool:
    """Whether `text` is a JSON list of strings."""
    try:
        value = parse_json(text)
    except ValueError:
        return False
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def base_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The name prefixes of the model's transformer blocks and input embeddings: where a classifier's head
    never lies (a delta whose head named a parameter there could overwrite a weight it never trained)."""
    embeddings = [f"{name}." for name, module in model.named_modules() if module is model.get_input_embeddings()]
    return (*(f"{blocks}." for blocks, _ in block_lists(model)), *embeddings)


def head_of(metadata: dict[str, str]) -> list[str]:
    """The parameters a delta holds whole (a classifier's head): none before format 3."""
    return json.loads(metadata.get("head", "[]"))


def task_of(metadata: dict[str, str]) -> tuple[str, list[str] | None]:
    """(the task a delta was trained for, its class names or None)."""
    task = metadata.get("task", "lm")
    return task, json.loads(metadata["classes"]) if task == "classify" else None


def tensor_problem(name: str, tensor: torch.Tensor, head: list[str] = ()) -> str | None:
    """What is wrong with one tensor of a delta, or None. A head's tensors are whole parameters of any shape."""
    if name not in head and not is_bias(name):
        return f"{name} is not a bias (a delta holds only parameters named '<layer>.bias')"
    if name not in head and tensor.dim() != 1:
        return f"{name} has shape {tuple(tensor.shape)}, but a bias is 1-D"
    if tensor.dtype != torch.float32:
        return f"{name} is {tensor.dtype}, but the delta's dtype is float32"
    if not torch.isfinite(tensor).all():
        return f"{name} holds NaN or inf values"
    return None


def read_delta(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a delta file (or of a PEFT BEFT adapter folder, bitfit.export.adapter),
    refused with a one-line BitfitError unless well formed: its metadata complete, every tensor a
    finite 1-D fp32 bias."""
    if Path(path).is_dir():
        if not is_beft_folder(path):
            if kind := adapter_type(path):
                raise BitfitError(f"{path} is a PEFT {kind} adapter, which changes weights; bitfit applies BitFit "
                                  "deltas and PEFT BEFT adapters (bias vectors) only: load it with "
                                  "peft.PeftModel.from_pretrained(base, folder)")
            raise BitfitError(f"{path} is a folder, but neither a delta file nor a PEFT BEFT adapter folder")
        tensors, metadata = read_beft(path)
    else:
        tensors, metadata = _read_file(path)
    problems = [metadata_problem(metadata), None if tensors else "it holds no biases"]
    head = head_of(metadata) + json.loads(metadata.get("whole", "[]")) if problems[0] is None else []
    problems += [*(tensor_problem(name, tensor, head) for name, tensor in tensors.items()),
                 *(f"its head lists {name}, which it does not hold" for name in head if name not in tensors),
                 None if problems[0] or any(name not in head for name in tensors) else "it holds no biases, only a head"]
    if "digest" in metadata and metadata["digest"] != content_digest(tensors, metadata):
        problems.append("its contents do not match its digest: it was changed after bitfit wrote it (a value, the "
                        "head, a class's name or place), so its predictions cannot be trusted; use the file as written")
    problem = next((problem for problem in problems if problem), None)
    if problem:
        raise BitfitError(f"{path} is not a valid bitfit delta: {problem}")
    return tensors, metadata


def _read_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not Path(path).is_file():
        raise BitfitError(f"delta file not found: {path}")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            # A whole model passed as --delta: do not read its gigabytes to say it is no delta.
            is_delta = metadata.get("format") in FORMATS
            tensors = {name: file.get_tensor(name) for name in file.keys()} if is_delta else {}
            lora = not is_delta and any("lora_" in name for name in file.keys())
    except Exception as error:  # safetensors raises its own error type for corrupt and truncated files
        raise BitfitError(f"{path} is not a readable safetensors file, corrupt or truncated ({error})") from None
    if lora:
        raise BitfitError(f"{path} holds a LoRA adapter's weights (lora_A/lora_B matrices), not a bitfit delta: LoRA "
                          "changes weights, BitFit only biases; load it with peft.PeftModel.from_pretrained")
    if not is_delta:
        raise BitfitError(f"{path} is not a bitfit delta (format {metadata.get('format')!r}, expected {FORMAT!r})")
    if "whole" in metadata:  # what bitfit.export.adapter's read-back adds in memory: never a file's
        raise BitfitError(f"{path} is not a valid bitfit delta: its metadata has 'whole', which no delta file has")
    return tensors, metadata


def check_delta(model: nn.Module, path: str, with_head: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A delta's tensors and metadata, once every check against `model` passed; `model` is not changed.

    Refuses, naming the base the delta was trained on, when the model lacks a tensor of the delta,
    has it in another shape, already holds an added bias, or has another fingerprint. The returned
    metadata's added_biases are the biases the model must be given (for a PEFT adapter: found here).
    `with_head=False`: a classifier's head is left out of the checks and of the tensors returned (many
    classifiers of one base share a model whose own head is none of theirs: bitfit.infer.mixed).
    """
    tensors, metadata = read_delta(path)
    params = dict(model.named_parameters())
    foreign = metadata["format"] == FOREIGN  # a PEFT adapter: biases on layers that have none are added ones
    added = [name for name in tensors if name not in params] if foreign else json.loads(metadata["added_biases"])
    head = head_of(metadata)
    if not with_head:
        tensors = {name: tensor for name, tensor in tensors.items() if name not in head}
    tensors = changes(tensors, [n for n in json.loads(metadata.get("whole", "[]")) if n in tensors], params, path)
    trained_on = f"this delta was trained on {metadata['base_model']!r} (fingerprint {metadata['base_fingerprint'] or 'unknown'})"
    task, classes = task_of(metadata)
    outputs = len(classes) if classes else 1
    if task != "lm" and with_head and getattr(model.config, "num_labels", None) != outputs:
        raise BitfitError(f"this model's head has {getattr(model.config, 'num_labels', None)} outputs and the delta's "
                          f"{outputs} ({task}{': ' + ', '.join(classes) if classes else ''}): load the base with the "
                          "delta's classes")
    modules = dict(model.named_modules())
    prefixes = base_prefixes(model)
    if weight := next((name for name in head if name.startswith(prefixes)), None):
        raise BitfitError(f"{path} is not a valid bitfit delta: its head lists {weight}, a parameter of the model's blocks "
                          "or embeddings; a head is what a classifier adds on top (a classifier, a score, a pooler), "
                          "never a weight or bias the base trained")
    for name, delta in tensors.items():
        if name in params:
            if params[name].shape != delta.shape:
                raise BitfitError(f"{name} has shape {tuple(params[name].shape)} in this model but {tuple(delta.shape)} in the delta: {trained_on}")
            if name in added and params[name].detach().any():
                # The fingerprint skips added biases, so it cannot see a delta applied to them twice.
                raise BitfitError(f"{name}, a bias bitfit added, is not zero in this model: does it already hold a delta? "
                                  f"{trained_on}")
        elif name in added:
            linear = modules.get(name.rsplit(".", 1)[0])
            if not isinstance(linear, nn.Linear) or tuple(delta.shape) != (linear.out_features,):
                raise BitfitError(f"this model has no linear layer to hold {name} of shape {tuple(delta.shape)}: {trained_on}")
        else:
            raise BitfitError(f"this model has no parameter {name}: {trained_on}")

    if not foreign:  # an adapter PEFT trained carries no fingerprint: its base cannot be checked
        samples = SAMPLES_1 if metadata["format"] == FORMAT_1 else None
        found = fingerprint(params.items(), exclude=[*added, *head], samples=samples)
        if found != metadata["base_fingerprint"]:
            raise BitfitError(f"this model's fingerprint is {found}, but {trained_on}")
    return tensors, {**metadata, "added_biases": json.dumps(added)}


def head_modules(model: nn.Module, head: list[str]) -> list[str]:
    """The modules that hold a classifier's head: each head parameter under the outermost module that holds
    nothing but head (RoBERTa's `classifier`, not its `classifier.dense`; a new pooler's `bert.pooler`)."""
    modules, found = dict(model.named_modules()), set()
    for name in head:
        path = name.rsplit(".", 1)[0]
        while "." in path:
            parent = path.rsplit(".", 1)[0]
            if not all(f"{parent}.{n}" in head for n, _ in modules[parent].named_parameters()):
                break
            path = parent
        found.add(path)
    return sorted(found)


def changes(tensors: dict[str, torch.Tensor], whole: list[str], params: dict[str, nn.Parameter],
            path: str) -> dict[str, torch.Tensor]:
    """A delta's tensors with the `whole` values (what a PEFT adapter saved whole: bitfit.export.adapter) made
    changes against `params`: a bias's value less the base's, and a parameter that is no bias dropped if
    it equals the base's (a LayerNorm's weight, saved beside its bias), refused if it does not."""
    result = dict(tensors)
    for name in whole:
        if name not in params or params[name].shape != tensors[name].shape:
            raise BitfitError(f"{path} holds {name} of shape {tuple(tensors[name].shape)}, which this model has not")
        base = params[name].detach().float().cpu()
        if name.rsplit(".", 1)[-1] == "bias":
            result[name] = tensors[name] - base
        elif torch.equal(tensors[name], base):
            del result[name]
        else:
            raise BitfitError(f"{path} changes {name}, which is no bias: BitFit never trains it, so this is no "
                              "BitFit adapter of this base")
    return result


def apply_delta(model: nn.Module, path: str) -> dict[str, str]:
    """Add a delta's biases to a base model, in place, once check_delta passed; return the metadata.
    Biases the delta says were added are added (zero) first; a head's parameters are set, not added.
    Nothing is changed unless every check passes."""
    tensors, metadata = check_delta(model, path)
    params, modules, head = dict(model.named_parameters()), dict(model.named_modules()), head_of(metadata)
    with torch.no_grad():
        for name, delta in tensors.items():
            if name not in params:
                add_zero_bias(modules[name.rsplit(".", 1)[0]])
            param = model.get_parameter(name)
            value = delta.to(device=param.device, dtype=param.dtype)
            param.copy_(value) if name in head else param.add_(value)
    return metadata


# ----------------------------------------------------------------------------------------------------
# A PEFT BEFT adapter folder, read as a delta (bitfit.export.adapter writes one)
# ----------------------------------------------------------------------------------------------------

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
    if "digest" in carried and carried["digest"] != content_digest(raw, carried):  # bitfit's export: its own files
        raise BitfitError(f"{folder} is not a valid bitfit delta: its contents do not match its digest: it was changed "
                          "after bitfit wrote it (a value, the head, a class's name or place); use the folder as written")
    metadata = {key: value for key, value in carried.items() if key != "digest"} if carried.get("format") in FORMATS \
        else foreign_metadata(config, whole, folder)
    head = set(head_of(metadata))
    if whole:
        metadata = {**metadata, "whole": json.dumps(sorted(set(whole) - head))}
    return {**tensors, **whole}, metadata


SEQ_CLS_HEADS = ("classifier", "score")  # the modules PEFT saves whole as a classifier's head (task_type SEQ_CLS)


def foreign_metadata(config: dict, whole: dict[str, torch.Tensor], folder: Path) -> dict[str, str]:
    """A delta's metadata for an adapter PEFT trained: no fingerprint (its base cannot be checked), added
    biases found when it is applied. A sequence classifier's (task_type SEQ_CLS) head is what PEFT saved
    whole of its classification modules; its classes are as many as the head's outputs (one: a regressor),
    named as transformers names them by default (LABEL_0, LABEL_1, ...): PEFT saves no names."""
    base = config.get("base_model_name_or_path")
    metadata = {"format": FOREIGN, "base_model": base if isinstance(base, str) else "", "base_fingerprint": "",
                "added_biases": "[]", "dtype": "float32", "selection": f"the PEFT BEFT adapter {folder}"}
    if config.get("task_type") != "SEQ_CLS":
        return metadata
    head = sorted(name for name in whole if name.split(".")[0] in SEQ_CLS_HEADS)
    outputs = [whole[name].shape[0] for name in head if name.endswith(".weight") and whole[name].dim() == 2]
    if not outputs:
        raise BitfitError(f"{folder} is a sequence classifier's adapter (task_type SEQ_CLS) without its head (no "
                          f"{' or '.join(SEQ_CLS_HEADS)} module saved whole): it cannot classify")
    # The last linear layer of the head gives the outputs (RoBERTa's classifier.out_proj, after its dense).
    classes = [f"LABEL_{i}" for i in range(outputs[-1])] if outputs[-1] > 1 else []
    return {**metadata, "task": "classify" if classes else "regress", "classes": json.dumps(classes),
            "head": json.dumps(head)}
