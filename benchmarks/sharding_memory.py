"""--shard-weights: what one GPU holds, and the largest model per GPU count, from the memory accounting.

    python benchmarks/sharding_memory.py            # the tables (seconds: the models are built on the meta device)
    python benchmarks/sharding_memory.py --check    # + the weight term checked against a measured sharded run
                                                    #   (torchrun, 2 CPU processes, the embedded SmolLM2, ~1 min)

The models are the real architectures (transformers' Llama and Qwen2 classes at their published sizes),
built with their parameters on the meta device, with bitfit's added zero biases: the parameter and bias
counts are exact. Per GPU, with the README's big-model flags (--bf16 --bf16-weights --shard-weights):

    weights      2 bytes x frozen parameters / N            each process's shard (bitfit.parallel.sharding)
    biases       4 bytes x 5 x biases                       flat values, gradient, base copy, AdamW's two moments
    gathered     2 bytes x (root group + 2 blocks)          the root (embeddings, head) is whole while the
                                                            forward (and the backward) runs; a block and the
                                                            next one FSDP prefetches
    activations  tokens x layers x 2 bytes x (6h + 2kv + 4i) what autograd keeps per token and layer of a
                                                            Llama block in bf16 for the backward (inputs of
                                                            the norms, q/k/v projections, SDPA, the MLP)
    logits       tokens x vocab x 10 bytes                  bf16 logits, their fp32 copy, its gradient

A pass holds `tokens` tokens: --max-pass-tokens, by default --batch-size x --max-len = 256. An estimate,
not a measurement: the CUDA context, FSDP's all-gather staging buffers, the norms' fp32 copies and the
allocator's fragmentation come out of the RESERVE kept free of an 80 GB card's 79.6 GiB. No GPU was lent
to check it; --check confirms the weight term only (the shards FSDP made), not a peak.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bitfit.core.biases import add_missing_biases, block_lists  # noqa: E402
from bitfit.model.pretrained import parameters_on_meta  # noqa: E402

GIB = 2**30
CARD = 79.6 * GIB  # an "80 GB" H100 / A100: what torch.cuda.mem_get_info reports on an idle card
RESERVE = 6 * GIB  # CUDA context, cuBLAS/NCCL workspaces, allocator fragmentation
GPUS = (1, 2, 4, 8, 16, 32)

# Published shapes: hidden, layers, heads, kv heads, MLP width, vocabulary, tied embeddings.
MODELS = {
    "SmolLM2-135M": (LlamaConfig, 576, 30, 9, 3, 1536, 49152, True),
    "Llama-3.1-8B": (LlamaConfig, 4096, 32, 32, 8, 14336, 128256, False),
    "Qwen2.5-32B": (Qwen2Config, 5120, 64, 40, 8, 27648, 152064, False),
    "Llama-3.1-70B": (LlamaConfig, 8192, 80, 64, 8, 28672, 128256, False),
    "Qwen2.5-72B": (Qwen2Config, 8192, 80, 64, 8, 29568, 152064, False),
    "Llama-3.1-405B": (LlamaConfig, 16384, 126, 128, 8, 53248, 128256, False),
}


def shape(name: str) -> dict:
    """The model's exact counts: frozen parameters, biases (native + added), root group, largest block."""
    config_class, hidden, layers, heads, kv_heads, mlp, vocab, tied = MODELS[name]
    config = config_class(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, intermediate_size=mlp, vocab_size=vocab,
                          tie_word_embeddings=tied)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    add_missing_biases(model)
    params = {name: p for name, p in model.named_parameters()}
    biases = sum(p.numel() for n, p in params.items() if n.endswith(".bias"))
    blocks = [block for _, stack in block_lists(model) for block in stack]
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    return {"frozen": sum(p.numel() for p in params.values()) - biases, "biases": biases, "layers": layers,
            "root": sum(p.numel() for p in model.parameters() if id(p) not in in_blocks),
            "block": max(sum(p.numel() for n, p in b.named_parameters() if not n.endswith(".bias")) for b in blocks),
            "per_token_layer": 2 * (6 * hidden + 2 * kv_heads * hidden // heads + 4 * mlp), "vocab": vocab}


def per_gpu(s: dict, gpus: int, tokens: int) -> dict:
    """Bytes one GPU holds, by term."""
    return {"weights": 2 * s["frozen"] / gpus, "biases": 4 * 5 * s["biases"],
            "gathered": 2 * (s["root"] + 2 * s["block"]) if gpus > 1 else 0,
            "activations": tokens * s["layers"] * s["per_token_layer"], "logits": tokens * s["vocab"] * 10}


def tables(tokens: int) -> None:
    shapes = {name: shape(name) for name in MODELS}
    print(f"\nGiB per GPU, --bf16 --bf16-weights --shard-weights, passes of {tokens} tokens; fits an 80 GB card when "
          f"<= {(CARD - RESERVE) / GIB:.1f} GiB ({RESERVE / GIB:.0f} GiB kept for CUDA and fragmentation)\n")
    print("| model | parameters | biases trained | 1 GPU (unsharded) | " + " | ".join(f"{n} GPUs" for n in GPUS[1:]) + " |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in GPUS) + " |")
    fits = {n: [name for name, s in shapes.items() if sum(per_gpu(s, n, tokens).values()) <= CARD - RESERVE] for n in GPUS}
    for name, s in shapes.items():
        cells = [f"{sum(per_gpu(s, n, tokens).values()) / GIB:,.1f}{'' if name in fits[n] else ' ✗'}" for n in GPUS]
        print(f"| {name} | {(s['frozen'] + s['biases']) / 1e9:,.2f} B | {s['biases'] / 1e6:,.1f} M | " + " | ".join(cells) + " |")
    largest = {n: max(fits[n], key=lambda name: shapes[name]["frozen"], default="none of these") for n in GPUS}
    print("\nthe largest that fits: " + ", ".join(f"{n} GPU{'s' * (n > 1)}: {largest[n]}" for n in GPUS))

    s, n = shapes["Llama-3.1-70B"], 8
    terms = per_gpu(s, n, tokens)
    print(f"\nLlama-3.1-70B on {n} GPUs, by term (GiB): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in terms.items()))
    weights = 2 * s["frozen"]
    gathered = 2 * (n - 1) / n * weights  # received per pass: the forward's gathers and the backward's again
    reduced = 2 * (n - 1) / n * 4 * s["biases"]  # a ring all-reduce of the flat fp32 gradient, per step
    print(f"bytes received per GPU: {gathered / 1e9:,.0f} GB of weights per pass (2 x (N-1)/N x {weights / 1e9:,.0f} GB), "
          f"{reduced / 1e6:,.1f} MB for the biases' one all-reduce per step ({gathered / reduced:,.0f}x less)")
    flops = 4 * (s["frozen"] + s["biases"]) * tokens  # forward 2PT + the backward's input gradients 2PT; no weight gradients
    print(f"compute per pass: {flops / 1e12:,.0f} TFLOP; at 400 TFLOP/s and 400 GB/s per GPU that is {flops / 400e12:.2f} s "
          f"of math for {gathered / 400e9:.2f} s of gathering: passes of ~{tokens * (gathered / 400e9) / (flops / 400e12):,.0f}+ "
          "tokens hide the gathers behind the math")


def check() -> None:
    """The weight term against a measured run: 2 CPU processes shard the embedded SmolLM2 (fp32)."""
    s = shape("SmolLM2-135M")
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        "--shard-weights", "--max-steps", "1", "--eval-data", "none", "--out-dir", str(run)],
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
        results = json.loads((run / "results.json").read_text())
    predicted = 4 * s["frozen"] / 2  # fp32 here
    print(f"\ncheck (2 CPU processes, SmolLM2-135M, fp32): predicted {predicted / 2**20:,.1f} MiB of weights per process, "
          f"in the local shards {', '.join(f'{b / 2**20:,.1f}' for b in results['weight_bytes_per_process'])} MiB; "
          f"bias buffer predicted {4 * s['biases'] / 2**20:.2f} MiB, measured "
          f"{', '.join(f'{b / 2**20:.2f}' for b in results['bias_buffer_bytes_per_process'])} MiB")


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_argument("--tokens", type=int, nargs="+", default=[256, 2048], help="tokens per pass")
    cli.add_argument("--check", action="store_true", help="also measure the weight term in a sharded CPU run")
    args = cli.parse_args()
    for tokens in args.tokens:
        tables(tokens)
    if args.check:
        check()


if __name__ == "__main__":
    main()
