"""The delta file: only what BitFit changed, in kilobytes to megabytes instead of a multi-GB model.

A safetensors file with one fp32 tensor per trained bias, named by its parameter name, holding
`tuned - base`. Its metadata (all strings, as safetensors requires):
    format            "bitfit-delta/1"
    base_model        the name or path the base was loaded from
    base_fingerprint  a hash of the base's parameters (see `fingerprint`)
    added_biases      JSON list of the biases bitfit added to a bias-free base (zero in the base)
    dtype             dtype of the delta tensors ("float32")
    selection         which biases were selected ("all", "reduced" or a pattern)
"""

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .biases import add_zero_bias
from .errors import BitfitError
from .flat import FlatBiases

FORMAT = "bitfit-delta/1"
SAMPLES_PER_TENSOR = 1024  # values hashed per parameter: enough to tell checkpoints apart, fast at 1B


def fingerprint(named_params: Iterable[tuple[str, torch.Tensor]], exclude: Iterable[str] = ()) -> str:
    """A short hash that tells one base model from another, from its parameters.

    Hashes each parameter's name, shape and an evenly spaced sample of its values rounded to bf16, so
    the same checkpoint stored in fp32 or bf16 gives the same fingerprint, while another checkpoint,
    a fine-tuned one or one whose biases already hold a delta does not. `exclude` skips the biases bitfit
    added (a fresh base does not have them).
    """
    skip = set(exclude)
    digest = hashlib.sha256()
    for name, tensor in sorted(named_params, key=lambda item: item[0]):
        if name in skip:
            continue
        values = tensor.detach().reshape(-1)
        count = min(values.numel(), SAMPLES_PER_TENSOR)
        # Integer arithmetic: float positions round past the end of tensors over 2**24 values.
        index = torch.arange(count, device=values.device) * (values.numel() - 1) // max(count - 1, 1)
        sample = values[index].to(torch.bfloat16).view(torch.int16).cpu()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def base_fingerprint(model: nn.Module, flat: FlatBiases, added: list[str]) -> str:
    """The fingerprint of the model before training: its trained biases taken at their base values."""
    base = flat.unflatten(flat.base)
    return fingerprint(((name, base.get(name, param)) for name, param in model.named_parameters()), exclude=added)


def save_delta(path: str, model: nn.Module, flat: FlatBiases, *, base_model: str, added: list[str], selection: str = "all") -> None:
    """Write `tuned - base` of every trained bias, with what is needed to check the base on load."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in flat.unflatten(flat.values - flat.base).items()}
    metadata = {
        "format": FORMAT,
        "base_model": base_model,
        "base_fingerprint": base_fingerprint(model, flat, added),
        "added_biases": json.dumps(added),
        "dtype": "float32",
        "selection": selection,
    }
    save_file(tensors, path, metadata=metadata)


def read_delta(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a delta file."""
    if not Path(path).is_file():
        raise BitfitError(f"delta file not found: {path}")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # safetensors raises its own error type for corrupt and truncated files
        raise BitfitError(f"{path} is not a readable safetensors file, corrupt or truncated ({error})") from None
    if metadata.get("format") != FORMAT:
        raise BitfitError(f"{path} is not a bitfit delta (format {metadata.get('format')!r}, expected {FORMAT!r})")
    return tensors, metadata


def apply_delta(model: nn.Module, path: str) -> dict[str, str]:
    """Add a delta's biases to a base model, in place; return the delta's metadata.

    Refuses, naming the base the delta was trained on, when the model lacks a tensor of the delta,
    has it in another shape, or has another fingerprint. Biases the delta says were added are added
    (zero) first. Nothing is changed unless every check passes.
    """
    tensors, metadata = read_delta(path)
    added = json.loads(metadata["added_biases"])
    trained_on = f"this delta was trained on {metadata['base_model']!r} (fingerprint {metadata['base_fingerprint']})"
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for name, delta in tensors.items():
        if name in params:
            if params[name].shape != delta.shape:
                raise BitfitError(f"{name} has shape {tuple(params[name].shape)} in this model but {tuple(delta.shape)} in the delta: {trained_on}")
        elif name in added:
            linear = modules.get(name.rsplit(".", 1)[0])
            if not isinstance(linear, nn.Linear) or linear.out_features != delta.numel():
                raise BitfitError(f"this model has no linear layer to hold {name} of shape {tuple(delta.shape)}: {trained_on}")
        else:
            raise BitfitError(f"this model has no parameter {name}: {trained_on}")

    found = fingerprint(params.items(), exclude=added)
    if found != metadata["base_fingerprint"]:
        raise BitfitError(f"this model's fingerprint is {found}, but {trained_on}")

    with torch.no_grad():
        for name, delta in tensors.items():
            if name not in params:
                add_zero_bias(modules[name.rsplit(".", 1)[0]])
            param = model.get_parameter(name)
            param.add_(delta.to(device=param.device, dtype=param.dtype))
    return metadata
