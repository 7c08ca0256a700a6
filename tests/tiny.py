"""Tiny models and a tiny tokenizer built from configs: no download, random weights, milliseconds;
and the one-step loss and bias gradient that several tests compare between layouts."""

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from bitfit.core.biases import add_missing_biases, select_biases
from bitfit.core.flat import FlatBiases
from bitfit.core.loss import label_tokens, loss_sum
from bitfit.data.tasks import builtin_records

# A chat template of the usual shape: role markers, each turn closed by the eos token.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@functools.cache
def _trained_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [f"Human: {r['instruction']}\n{r['input']}\n\nAssistant: {r['output']}" for r in builtin_records("train")[:400]]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def tiny_tokenizer(padding_side: str = "right", pad: bool = True, chat: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~400 tokens) trained on the built-in task; eos '</s>', pad '<pad>'."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_trained_bpe(),
        eos_token="</s>",
        pad_token="<pad>" if pad else None,
        padding_side=padding_side,
        chat_template=CHAT_TEMPLATE if chat else None,
    )


def tiny_bloom(seed: int = 0, blocks: int = 2) -> BloomForCausalLM:
    """BLOOM shape with native biases everywhere: 2 blocks, hidden 32, 4 heads.

    Weights drawn 10x wider than the config default, so the outputs are peaked as a trained model's
    are, and a few bias-only steps visibly lower the loss."""
    torch.manual_seed(seed)
    config = BloomConfig(vocab_size=400, hidden_size=32, n_layer=blocks, n_head=4, initializer_range=0.2)
    return BloomForCausalLM(config).eval()


def tiny_llama(seed: int = 0, blocks: int = 2) -> LlamaForCausalLM:
    """Llama shape, bias-free like SmolLM2: 2 blocks, hidden 32, 4 heads (2 kv heads), tied embeddings."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=blocks,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def step_loss_and_gradient(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` as one optimizer step: its token-mean loss, and the gradient of every bias (zero biases
    added where the model has none) as the one flat buffer the optimizer steps."""
    add_missing_biases(model)
    flat = FlatBiases(model, select_biases(model))
    loss = loss_sum(model, batch) / label_tokens(batch)
    loss.backward()
    return loss.detach(), flat.grads.clone()


def tiny_encoder(kind: str = "bert", seed: int = 0, pooler: bool = True):
    """A BERT- or RoBERTa-shaped encoder without a head, as an encoder checkpoint is: 2 layers, hidden 32,
    4 heads; vocabulary of tiny_tokenizer. `pooler=False`: no pooler, as in many sentence-embedding
    checkpoints (its classifier then needs a new one)."""
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    shape = dict(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=130, initializer_range=0.2, pad_token_id=0)
    if kind == "roberta":
        return RobertaModel(RobertaConfig(**shape, type_vocab_size=1), add_pooling_layer=pooler).eval()
    return BertModel(BertConfig(**shape), add_pooling_layer=pooler).eval()
