import pytest

from graphs import AttentionSpec, SpecError, spec_from_module


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"embed_dim": 10, "num_heads": 4}, "embed_dim (10) must be divisible by num_heads (4)"),
        ({"embed_dim": 0, "num_heads": 1}, "embed_dim must be a positive integer, got 0"),
        ({"embed_dim": 8, "num_heads": -2}, "num_heads must be a positive integer, got -2"),
        ({"embed_dim": 8.0, "num_heads": 2}, "embed_dim must be a positive integer, got 8.0"),
        ({"embed_dim": 8, "num_heads": 2, "kdim": 0}, "kdim must be a positive integer, got 0"),
        (
            {"embed_dim": 8, "num_heads": 2, "dropout": 1.5},
            "dropout must be a probability between 0 and 1, got 1.5",
        ),
        ({"embed_dim": 8, "num_heads": 2, "bias": "yes"}, "bias must be True or False, got 'yes'"),
        (
            {"embed_dim": 8, "num_heads": 2, "key_padding_mask": "int"},
            "key_padding_mask must be 'bool', 'float' or None, got 'int'",
        ),
        (
            {"embed_dim": 8, "num_heads": 2, "attn_mask_3d": True},
            "attn_mask_3d needs an attn_mask input",
        ),
        (
            {"embed_dim": 8, "num_heads": 2, "self_attention": True, "kdim": 4},
            "self_attention uses the query as key and value, so kdim (4) must equal embed_dim (8) or be unset",
        ),
        (
            {"embed_dim": 8, "num_heads": 2, "average_attn_weights": False},
            "average_attn_weights=False only applies with need_weights=True",
        ),
    ],
)
def test_each_broken_rule_is_one_sentence_naming_the_option(options, message):
    with pytest.raises(SpecError) as info:
        AttentionSpec(**options)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_from_dict_rejects_unknown_and_missing_options():
    with pytest.raises(SpecError, match="unknown spec option 'heads'"):
        AttentionSpec.from_dict({"embed_dim": 8, "heads": 2})
    with pytest.raises(SpecError, match="num_heads is required"):
        AttentionSpec.from_dict({"embed_dim": 8})
    spec = AttentionSpec(8, 2, key_padding_mask="bool")
    assert AttentionSpec.from_dict(spec.to_dict()) == spec


def test_signature_follows_torch_names_layout_and_symbolic_axes():
    spec = AttentionSpec(
        8,
        2,
        kdim=3,
        vdim=5,
        key_padding_mask="bool",
        attn_mask="float",
        attn_mask_3d=True,
        add_bias_kv=True,
        add_zero_attn=True,
        need_weights=True,
        average_attn_weights=False,
    )
    assert [(s.name, s.dtype, s.shape) for s in spec.inputs()] == [
        ("query", "float32", ("tgt_len", "batch", 8)),
        ("key", "float32", ("src_len", "batch", 3)),
        ("value", "float32", ("src_len", "batch", 5)),
        ("key_padding_mask", "bool", ("batch", "src_len")),
        ("attn_mask", "float32", ("batch*2", "tgt_len", "src_len")),
    ]
    assert [(s.name, s.shape) for s in spec.outputs()] == [
        ("attn_output", ("tgt_len", "batch", 8)),
        ("attn_output_weights", ("batch", 2, "tgt_len", "src_len+2")),
    ]
    self_attn = AttentionSpec(8, 2, batch_first=True, self_attention=True, key_padding_mask="float")
    assert [(s.name, s.shape) for s in self_attn.inputs()] == [
        ("query", ("batch", "tgt_len", 8)),
        ("key_padding_mask", ("batch", "tgt_len")),
    ]


def test_spec_from_a_live_module():
    torch = pytest.importorskip("torch")
    module = torch.nn.MultiheadAttention(
        12, 3, bias=False, add_bias_kv=True, kdim=5, vdim=7, batch_first=True, dropout=0.1
    )
    spec = spec_from_module(module, need_weights=True)
    assert (
        spec.embed_dim,
        spec.num_heads,
        spec.bias,
        spec.add_bias_kv,
        spec.kdim,
        spec.vdim,
        spec.batch_first,
        spec.dropout,
        spec.need_weights,
    ) == (12, 3, False, True, 5, 7, True, 0.1, True)
