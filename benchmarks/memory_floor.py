"""Where bitfit's CPU memory goes on the embedded SmolLM2-135M, and what storing weights below fp32 would cost.

    python benchmarks/memory_floor.py

Measures, in this one process, the resident memory (RSS, split into anonymous and file-backed pages):
    runtime       torch + transformers + bitfit imported, before any model
    model code    the modeling code imported and the model built on the meta device (no weights)
    weights       loaded and every page read; transformers maps the safetensors file, so the weights
                  are file-backed pages, read once and never copied
    one pass      a packed pass of the built-in task's default step (8 examples): what autograd keeps
                  for the backward, by kind (counted with saved-tensor hooks, parameters left out),
                  what the RSS grows by, and what glibc keeps after the backward for the next pass
Then how far rounding the frozen weight matrices to fp16 or bf16 moves the loss, against the 1e-3
relative agreement with the fp32 recipe that the speed benchmark asks for.
"""

import argparse
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workload import load_model  # noqa: E402  (the model as train.py sets it up)

from bitfit.core.loss import label_tokens, loss_sum  # noqa: E402
from bitfit.data.examples import encode  # noqa: E402
from bitfit.data.packing import pack_batch, use_per_example_attention  # noqa: E402
from bitfit.data.sources import load_records


def rss() -> dict[str, float]:
    """The resident set now, in GiB: total, anonymous, file-backed (/proc/self/status)."""
    fields = {line.split(":")[0]: int(line.split()[1]) / 2**20 for line in open("/proc/self/status")
              if line.startswith(("VmRSS", "RssAnon", "RssFile"))}
    return {"total": fields["VmRSS"], "anon": fields["RssAnon"], "file": fields["RssFile"]}


def show(label: str, before: dict[str, float] | None = None) -> dict[str, float]:
    now = rss()
    grew = f" (+{now['total'] - before['total']:.2f})" if before else ""
    print(f"{label:<58} {now['total']:.2f} GiB{grew}  [anonymous {now['anon']:.2f}, file-backed {now['file']:.2f}]")
    return now


def saved_by_kind(model, batch, hidden: int, intermediate: int, vocab: int) -> Counter:
    """Bytes autograd keeps for the backward of one pass, by what they are (parameters left out)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kinds = {intermediate: "MLP (gate, SiLU(gate), up)", vocab: "logits at label positions",
             hidden: "norm inputs", model.config.head_dim: "attention (q, k, v, output)"}
    kept: dict[int, tuple[int, str]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kind = kinds.get(tensor.shape[-1] if tensor.dim() else 0, "other")
            kept[storage.data_ptr()] = (storage.nbytes(), kind)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_sum(model, batch)
    by_kind = Counter()
    for size, kind in kept.values():
        by_kind[kind] += size
    return by_kind, loss


@torch.no_grad()
def mean_losses(model, batches) -> torch.Tensor:
    return torch.stack([loss_sum(model, batch) / label_tokens(batch) for batch in batches])


def main() -> None:
    # The first use of the embedded model dequantizes its GGUF file, which leaves memory behind that a
    # cached load never allocates: do that once in a child process so it does not count here.
    subprocess.run([sys.executable, "-c", "from bitfit.model import pretrained; pretrained.resolve(pretrained.EMBEDDED)"],
                   cwd=Path(__file__).resolve().parent.parent, check=True)
    runtime = show("runtime (torch + transformers + bitfit imported)")
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitfit.model import pretrained

    config = AutoConfig.from_pretrained(pretrained.resolve(pretrained.EMBEDDED))
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)
    code = show("model code imported, model built on the meta device", runtime)
    model, tokenizer = load_model()
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())  # reads every weight: all their pages are now resident
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    loaded = show(f"weights loaded and read (their size: {weights:.2f} GiB)", code)

    assert use_per_example_attention(model)
    records, _ = load_records("builtin", "train")
    examples, _ = encode(records, tokenizer)
    batch = pack_batch(examples[:8])
    tokens = batch["input_ids"].numel()
    by_kind, loss = saved_by_kind(model, batch, config.hidden_size, config.intermediate_size, config.vocab_size)
    forward = show(f"after the forward of one packed pass of 8 ({tokens} tokens)", loaded)
    loss.backward()
    del loss
    show("after its backward (freed memory kept by glibc for the next pass)", forward)
    total = sum(by_kind.values())
    print(f"kept by autograd for the backward: {total / 2**30:.3f} GiB, {total / tokens / 2**20:.2f} MiB per token:")
    for kind, size in by_kind.most_common():
        print(f"  {kind:<30} {size / tokens / 2**10:7.0f} KiB per token ({100 * size / total:4.1f}%)")

    batches = [pack_batch(examples[start : start + 8]) for start in range(0, 80, 8)]
    fp32_losses = mean_losses(model, batches)
    matrices = {name: p.detach().clone() for name, p in model.named_parameters() if p.dim() == 2}
    for dtype in (torch.float16, torch.bfloat16):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in matrices:
                    p.copy_(matrices[name].to(dtype).float())  # stored in 16 bits, computed in fp32
        change = ((mean_losses(model, batches) - fp32_losses).abs() / fp32_losses).max()
        print(f"weight matrices rounded to {str(dtype).removeprefix('torch.')}: the loss of 10 packed passes moves "
              f"by up to {change:.1e} relative (half the weights' {weights:.2f} GiB saved)")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no flags: --help says what it measures
    main()
