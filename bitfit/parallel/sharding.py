"""Sharded frozen weights under torchrun (--shard-weights): models bigger than one GPU.

    torchrun --nproc_per_node=8 train.py --shard-weights --bf16 --bf16-weights --model meta-llama/Llama-3.1-70B

Plain data parallelism (bitfit.run.ranks) keeps a whole model on every process. With --shard-weights
each process holds 1/N of every frozen weight instead: PyTorch's FSDP2 (`fully_shard`) makes every
transformer block one group, and the rest of the model (embeddings, final norm, LM head) the root
group. Just before a block runs, its weights are all-gathered from the N processes, and they are freed
again after it: in the forward, and once more in the backward, which needs them for the activations'
gradients.

The trained biases are NOT sharded. FSDP is told to ignore them, so they stay views into the flat fp32
buffer (bitfit.core.flat) on every process, whole, and the step keeps its ONE all-reduce of the flat
gradient. The weights are frozen and get no gradient, so FSDP has nothing to reduce-scatter. A step's
traffic per process, for weights of W bytes: each pass receives (N-1)/N x W twice (forward, backward);
the biases' all-reduce moves about 2 x 4 bytes per bias, whatever the model's size.

Loading never holds the model N times in a node's memory: the model is built with its parameters on
the meta device (bitfit.model.pretrained.load), sharded while it has no values, and each process then reads only
its own rows of each weight from the safetensors files (rows r*ceil(R/N) onward: FSDP2 shards dim 0
as torch.chunk does).

Every forward is now a collective: all processes run the same number of passes per step (bitfit.data.layout
gives a process with less work idle passes), evaluation runs on every process (rank 0 reports it), and
generation runs with `synced_gpus`, so a process whose answers ended keeps stepping with the others.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh

from bitfit.core.biases import Selection, block_lists
from bitfit.core.errors import BitfitError
from bitfit.files import size
from bitfit.model import pretrained
from bitfit.model.pretrained import local_folder
from bitfit.run import ranks


def shard(model: nn.Module, selection: Selection, device: torch.device, world: int) -> None:
    """Make a model whose parameters are on the meta device a sharded one on `device`: each block one
    FSDP2 group, the root another, the selected biases ignored (whole on every process). Parameters
    get memory but no values yet (see `fill`); buffers keep theirs."""
    stacks = block_lists(model)
    if not stacks:  # one root group would gather the whole model at once: no memory saved
        raise BitfitError(f"--shard-weights shards a model block by block, and this {type(model).__name__} has no "
                          "stack of blocks (no nn.ModuleList); train it without --shard-weights")
    params = dict(model.named_parameters())
    ignored = {params[name] for name in selection}
    mesh = init_device_mesh(device.type, (world,))
    for _, blocks in stacks:
        for block in blocks:
            fully_shard(block, mesh=mesh, ignored_params=ignored)
    # The root too is freed after the forward and gathered again for the backward, like every block.
    # FSDP's default keeps the root's weights (embeddings, head) whole in between: faster, 2 x vocab x
    # hidden bytes more, and in bf16 on CPU (gloo, torch 2.13) its backward fails ("Trying to resize
    # storage that is not resizable").
    fully_shard(model, mesh=mesh, ignored_params=ignored, reshard_after_forward=True)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)  # also empties the buffers, which were made whole on the CPU: put them back
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])


INDEX = "model.safetensors.index.json"


def shard_and_fill(model: nn.Module, selection: Selection, source: str, added: list[str], device: torch.device,
                   rank: int, world: int, causal: bool) -> str:
    """A model built on the meta device sharded (`shard`) and its weights read (`fill`), then, for a
    causal LM, checked to be one (every process takes part); what each process holds, for the log."""
    shard(model, selection, device, world)
    fill(model, pretrained.resolve(source), added, rank, world)
    if causal:
        pretrained.check_causal(model, source)
    held = max(ranks.gather(pretrained.local_weight_bytes(model)))
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return (f"weights: sharded over {world} processes (FSDP2): {size(held)} of the {size(frozen)} of frozen weights on "
            "each; the flat bias buffer whole on each")


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it} of a model folder (one file, or an index of several)."""
    if (folder / INDEX).is_file():
        return {name: folder / file for name, file in json.loads((folder / INDEX).read_text())["weight_map"].items()}
    where = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as tensors:
            where |= dict.fromkeys(tensors.keys(), file)
    return where


def model_folder(source: str) -> Path:
    """The local folder of a model's safetensors files: `source` itself, or the hub's download of them
    (the files its index names, or model.safetensors: not a repository's other copies of the weights)."""
    if folder := local_folder(source):  # pretrained.load's rule for what is a folder and what a hub name
        return folder
    from huggingface_hub import (  # transformers' own dependency
        hf_hub_download,
        snapshot_download,
    )

    try:
        try:
            index = json.loads(Path(hf_hub_download(source, INDEX)).read_text())
            wanted = [INDEX, *sorted(set(index["weight_map"].values()))]
        except Exception:  # noqa: BLE001: no index, so one file
            wanted = ["model.safetensors"]
        return Path(snapshot_download(source, allow_patterns=wanted))
    except Exception as error:  # noqa: BLE001: offline, gated, missing: the user's to fix, in one line
        raise BitfitError(f"--shard-weights: could not download the safetensors weights of {source!r}: "
                          f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}") from None


@torch.no_grad()
def fill(model: nn.Module, source: str, added: list[str], rank: int, world: int) -> None:
    """Read this process's part of every parameter from the checkpoint: its rows of a sharded weight,
    all of an ignored bias; the biases bitfit added are zeros. A parameter the checkpoint lacks, or holds
    in another shape, is a BitfitError naming it (checkpoints whose names transformers renames on
    loading are not read here)."""
    files = checkpoint_files(model_folder(source))
    if not files:
        raise BitfitError(f"--shard-weights reads safetensors files, and {source} has none; train it without --shard-weights")
    prefix = getattr(model, "base_model_prefix", "") + "."  # hub BLOOM files say 'h.0...', the model 'transformer.h.0...'
    opened: dict[Path, object] = {}

    def stored(name: str):
        """The checkpoint's tensor for `name` (read lazily, by slices), or None."""
        key = name if name in files else name.removeprefix(prefix)
        if key not in files:
            return None
        if files[key] not in opened:
            opened[files[key]] = safe_open(str(files[key]), "pt")
        return opened[files[key]].get_slice(key)

    for name, param in model.named_parameters():
        if name in added:
            param.zero_()
            continue
        tensor = stored(name)
        if tensor is None or tuple(tensor.get_shape()) != tuple(param.shape):
            found = "no tensor" if tensor is None else f"a tensor of shape {tuple(tensor.get_shape())}"
            raise BitfitError(f"--shard-weights: the checkpoint of {source} has {found} for {name} {tuple(param.shape)}; "
                              "it reads safetensors by the model's parameter names, so train this model without "
                              "--shard-weights")
        if isinstance(param, DTensor):  # rows [rank * ceil(R/N), ...) of a dim-0 shard
            local = param.to_local()
            rows = -(-param.shape[0] // world)
            start = min(rank * rows, param.shape[0])
            assert local.shape[0] == min(rows, param.shape[0] - start), (name, local.shape, param.shape)
            local.copy_(tensor[start : start + local.shape[0]])
        else:
            param.copy_(tensor[:])
    for name, buffer in model.named_buffers():  # a buffer the checkpoint holds (most are computed, not stored)
        if (tensor := stored(name)) is not None:
            buffer.copy_(tensor[:])
