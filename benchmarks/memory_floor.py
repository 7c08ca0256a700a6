"""Where bitfit's CPU memory goes on the embedded SmolLM2-135M, and what storing weights below fp32 would cost.

    python benchmarks/memory_floor.py

Measures, in this one process: the resident memory (RSS) of the PyTorch + transformers runtime before
any model; the fp32 weights once every page of them has been read; the activations autograd keeps for
the backward of one packed pass of 8 built-in examples (counted with saved-tensor hooks, weights left
out); and how much rounding the frozen weight matrices to fp16 or bf16 moves the loss of 10 such passes,
against the 1e-3 relative agreement with the fp32 Trainer that the benchmark asks for.
"""

import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitfit.packing import pack_batch  # noqa: E402
from bitfit.data import encode, load_records  # noqa: E402
from bitfit.loss import label_tokens, loss_sum  # noqa: E402
from workload import load_model  # noqa: E402  (the model as train.py sets it up)


def rss_gib() -> float:
    """The resident set now (not the peak): /proc/self/status's VmRSS."""
    line = next(line for line in open("/proc/self/status") if line.startswith("VmRSS"))
    return int(line.split()[1]) / 2**20


def saved_activation_bytes(model, batch) -> int:
    """Bytes autograd keeps for the backward of one pass, not counting parameters (they exist anyway)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_sum(model, batch)
    return sum(kept.values())


@torch.no_grad()
def mean_losses(model, batches) -> torch.Tensor:
    return torch.stack([loss_sum(model, batch) / label_tokens(batch) for batch in batches])


def main() -> None:
    # The first use of the embedded model dequantizes its GGUF file, which leaves memory behind that a
    # cached load never allocates: do that once in a child process so it does not count here.
    subprocess.run([sys.executable, "-c", "from bitfit import models; models.resolve(models.EMBEDDED)"],
                   cwd=Path(__file__).resolve().parent.parent, check=True)
    runtime = rss_gib()
    model, tokenizer = load_model()
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())  # reads every weight: all their pages are now resident
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"runtime (torch + transformers + bitfit imported, no model): {runtime:.2f} GiB RSS")
    print(f"after loading and reading the fp32 model:                   {rss_gib():.2f} GiB RSS "
          f"(its parameters: {weights:.2f} GiB)")
    examples, _ = encode(load_records("builtin", "train"), tokenizer)
    batches = [pack_batch(examples[start : start + 8]) for start in range(0, 80, 8)]
    fp32_losses = mean_losses(model, batches)

    tokens = batches[0]["input_ids"].numel()
    activations = saved_activation_bytes(model, batches[0])
    print(f"activations kept for backward, one packed pass of 8 examples ({tokens} tokens): {activations / 2**30:.2f} GiB "
          f"({activations / tokens / 2**20:.2f} MiB per token)")

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
    main()
