import pytest

from mmmoe.moe import MoEConfig

BASE = dict(d_model=16, num_experts=4, expert_hidden=8)


@pytest.mark.parametrize(
    "field,value",
    [
        ("d_model", 0),
        ("d_model", 12.5),
        ("num_experts", -1),
        ("expert_hidden", True),
        ("top_k", 5),  # > num_experts
        ("num_heads", 3),  # does not divide d_model
        ("activation", "relu"),
        ("router", "hash"),
        ("balancing", "none"),
        ("head_layer", "yes"),
        ("merge_layer", 1),
        ("shared_expert_hidden", -8),
        ("capacity_factor", 0.0),
        ("capacity_factor", "1.0"),
        ("aux_loss_coef", -0.1),
        ("z_loss_coef", float("nan")),
        ("bias_update_rate", -1),
        ("xmoe_dim", 0),
        ("xmoe_temperature", 0),
        ("bitnet", "true"),
        ("sub_token_residual", None),
        ("activation_threshold", -0.5),
    ],
)
def test_bad_value_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}="):
        MoEConfig(**{**BASE, field: value})


def test_defaults_and_derived_switches():
    c = MoEConfig(**BASE)
    assert (c.top_k, c.num_heads, c.capacity_factor, c.activation) == (1, 1, None, "swiglu")
    assert not c.use_head_layer and not c.use_merge_layer  # h = 1: plain SMoE
    c2 = MoEConfig(**BASE, num_heads=4)
    assert c2.use_head_layer and c2.use_merge_layer and c2.head_dim == 4
    c3 = MoEConfig(**BASE, num_heads=4, head_layer=False)
    assert not c3.use_head_layer and c3.use_merge_layer


def test_round_trip_and_unknown_keys():
    c = MoEConfig(**BASE, num_heads=2, top_k=2, router="xmoe")
    assert MoEConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown field.*num_expert"):
        MoEConfig.from_dict({**BASE, "num_expert": 3})
