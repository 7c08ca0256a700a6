import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    LlamaConfig,
    T5Config,
    T5ForConditionalGeneration,
)

from bitfit.core.biases import (
    add_missing_biases,
    count_trainable,
    describe,
    select_biases,
)
from bitfit.core.errors import BitfitError
from tiny import tiny_bloom, tiny_llama


def on_meta(config):
    """The full-size architecture with no weights behind it: shapes and names only, instant."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_bloomz_1b1_shape_trains_408576_of_1065314304_parameters():
    model = on_meta(BloomConfig(vocab_size=250880, hidden_size=1536, n_layer=24, n_head=16))
    assert add_missing_biases(model) == []  # BLOOM has every bias already
    trainable, total = count_trainable(model, select_biases(model))
    assert (trainable, total) == (408_576, 1_065_314_304)
    assert describe(trainable, total) == "trainable: 408,576 / 1,065,314,304 parameters (0.0384%)"


def test_bloom_1b4_zh_shape_trains_544768_of_1303111680_parameters():
    model = on_meta(BloomConfig(vocab_size=46145, hidden_size=2048, n_layer=24, n_head=16))
    assert count_trainable(model, select_biases(model)) == (544_768, 1_303_111_680)


def test_smollm2_135m_shape_gets_155520_zero_biases():
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    model = on_meta(config)
    with pytest.raises(BitfitError, match="has 0 bias tensors"):
        select_biases(model)
    added = add_missing_biases(model)
    assert len(added) == 30 * 7  # q, k, v, o, gate, up, down in each block
    trainable, total = count_trainable(model, select_biases(model))
    assert (trainable, total) == (155_520, 134_515_008 + 155_520)
    assert describe(trainable, total).endswith("(0.1155%)")


def test_added_biases_leave_the_logits_identical():
    model = tiny_llama()
    input_ids = torch.randint(0, 400, (2, 12))
    with torch.no_grad():
        before = model(input_ids).logits
        add_missing_biases(model)
        after = model(input_ids).logits
    assert torch.equal(before, after)


def test_biases_are_added_inside_the_blocks_only_never_to_the_lm_head():
    model = tiny_llama()
    added = add_missing_biases(model)
    assert all(name.startswith("model.layers.") for name in added)
    assert model.lm_head.bias is None
    assert "model.layers.0.self_attn.q_proj.bias" in added and "model.layers.1.mlp.down_proj.bias" in added


def test_the_trainable_set_is_exactly_the_parameters_named_bias():
    model = tiny_bloom()
    selection = select_biases(model)
    expected = {name for name, _ in model.named_parameters() if name.endswith(".bias")}
    assert set(selection) == expected
    assert {name for name, p in model.named_parameters() if p.requires_grad} == expected


def test_t5_relative_attention_bias_table_is_not_a_bias():
    config = T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    names = [name for name, _ in model.named_parameters()]
    assert any("relative_attention_bias" in name for name in names)
    add_missing_biases(model)
    selection = select_biases(model)
    assert not any("relative_attention_bias" in name for name in selection)
    assert all(name.endswith(".bias") for name in selection)


def test_a_selection_that_picks_nothing_fails_loudly():
    with pytest.raises(BitfitError, match="nothing would train"):
        select_biases(tiny_bloom(), "no_such_layer")


def test_an_invalid_pattern_is_a_clear_error():
    with pytest.raises(BitfitError, match="valid regular expression"):
        select_biases(tiny_bloom(), "h.(0")


def test_a_name_pattern_selects_the_matching_biases():
    model = tiny_bloom()
    selection = select_biases(model, r"h\.1\..*dense")
    assert set(selection) == {"transformer.h.1.self_attention.dense.bias", "transformer.h.1.mlp.dense_h_to_4h.bias",
                              "transformer.h.1.mlp.dense_4h_to_h.bias"}


def test_reduced_selection_trains_query_and_first_mlp_biases_of_a_llama():
    model = tiny_llama()
    add_missing_biases(model)
    selection = select_biases(model, "reduced")
    expected = {f"model.layers.{i}.{m}.bias" for i in range(2) for m in ("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj")}
    assert set(selection) == expected
    assert all(mask.all() for mask in selection.values())


def test_reduced_selection_masks_the_query_part_of_blooms_fused_qkv_bias():
    model = tiny_bloom()  # hidden 32, 4 heads: head_dim 8, fused output laid out (head, q|k|v, 8)
    selection = select_biases(model, "reduced")
    assert set(selection) == {f"transformer.h.{i}.{m}.bias" for i in range(2)
                              for m in ("self_attention.query_key_value", "mlp.dense_h_to_4h")}
    mask = selection["transformer.h.0.self_attention.query_key_value.bias"]
    expected = torch.zeros(4, 3, 8, dtype=torch.bool)
    expected[:, 0, :] = True  # the query slot of every head
    assert torch.equal(mask, expected.reshape(-1))
    assert count_trainable(model, selection)[0] == 2 * (32 + 128)  # per block: query 32 + MLP 4 * 32


# --- the paper's bias groups ------------------------------------------------------------------------

def test_the_papers_groups_on_the_embedded_encoder_train_its_reduced_set_and_its_m3_biases():
    from bitfit.core.biases import group_counts
    from bitfit.model import pretrained

    model, _, head = pretrained.load_classifier("embedded-encoder", ["a", "b"])  # all-MiniLM-L6-v2: 6 layers, 384 wide
    reduced = select_biases(model, "query,intermediate", head)
    assert group_counts(model, reduced, head) == {"query": 6 * 384, "intermediate": 6 * 1536}  # 11,520
    assert select_biases(model, "reduced", head).keys() == reduced.keys()
    output = select_biases(model, "output", head)  # m3 alone: never the attention's output.dense (m1)
    assert {name for name in output if name not in head} == {f"bert.encoder.layer.{i}.output.dense.bias" for i in range(6)}
    assert group_counts(model, output, head) == {"output": 2304}


@pytest.mark.parametrize(("make", "group", "modules"), [
    (tiny_llama, "attention-output", ["self_attn.o_proj"]), (tiny_llama, "output", ["mlp.down_proj"]),
    (tiny_llama, "intermediate", ["mlp.gate_proj", "mlp.up_proj"]),
    (tiny_bloom, "attention-output", ["self_attention.dense"]), (tiny_bloom, "output", ["mlp.dense_4h_to_h"]),
    (tiny_bloom, "layernorm", ["input_layernorm", "post_attention_layernorm"]),
])
def test_each_group_picks_its_modules_in_each_family(make, group, modules):
    model = make()
    add_missing_biases(model)
    picked = {name for name in select_biases(model, group) if ".h." in name or ".layers." in name}  # the blocks'
    blocks = "transformer.h" if make is tiny_bloom else "model.layers"
    assert picked == {f"{blocks}.{i}.{module}.bias" for i in range(2) for module in modules}


@pytest.mark.parametrize(("groups", "parts"), [("key", [1]), ("query,value", [0, 2]), ("query,key,value", [0, 1, 2])])
def test_groups_of_a_fused_qkv_bias_train_exactly_their_parts(groups, parts):
    from bitfit.core.biases import group_counts

    model = tiny_bloom()  # hidden 32, 4 heads: the fused output laid out (head, q|k|v, 8)
    selection = select_biases(model, groups)
    expected = torch.zeros(4, 3, 8, dtype=torch.bool)
    expected[:, parts, :] = True
    assert torch.equal(selection["transformer.h.0.self_attention.query_key_value.bias"], expected.reshape(-1))
    assert group_counts(model, selection) == {name: 2 * 32 for name in groups.split(",")}


def test_a_list_that_is_not_all_groups_is_a_regular_expression():
    model = tiny_bloom()
    assert set(select_biases(model, "query_key_value|dense_4h")) == {
        f"transformer.h.{i}.{m}.bias" for i in range(2) for m in ("self_attention.query_key_value", "mlp.dense_4h_to_h")}
    with pytest.raises(BitfitError, match="nothing would train"):  # 'query,foo' names no bias: no group list
        select_biases(model, "query,foo")


def test_gpt2s_and_berts_biases_fall_into_the_papers_groups():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    from bitfit.core.biases import group_counts

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    assert group_counts(gpt2, select_biases(gpt2)) == {  # c_attn's thirds, c_proj of each, c_fc, ln_1/ln_2/ln_f
        "query": 64, "key": 64, "value": 64, "attention-output": 64, "intermediate": 256, "output": 64, "layernorm": 160}
    assert set(select_biases(gpt2, "output")) == {f"transformer.h.{i}.mlp.c_proj.bias" for i in range(2)}
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64))
    for group, module in (("query", "attention.self.query"), ("key", "attention.self.key"),
                          ("value", "attention.self.value"), ("attention-output", "attention.output.dense")):
        assert set(select_biases(bert, group)) == {f"encoder.layer.{i}.{module}.bias" for i in range(2)}
