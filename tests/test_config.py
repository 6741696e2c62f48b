import pytest

from sal_hf import SALConfig


def test_defaults_resolve_num_areas_per_method():
    assert SALConfig().num_areas == 16
    assert SALConfig(method="dfa").num_areas == 1
    assert SALConfig(method="bp").num_areas == 1


@pytest.mark.parametrize("num_areas", [0, -3])
def test_num_areas_below_one_is_rejected_with_its_value(num_areas):
    with pytest.raises(ValueError, match=rf"num_areas must be an integer >= 1, got {num_areas}"):
        SALConfig(num_areas=num_areas)


def test_unknown_method_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"method='hebbian' is not supported.*'sal', 'dfa', 'bp'"):
        SALConfig(method="hebbian")


def test_dfa_with_several_areas_contradicts_itself():
    with pytest.raises(ValueError, match="method='dfa' means one area.*num_areas=4"):
        SALConfig(method="dfa", num_areas=4)


def test_sal_with_one_area_is_refused_as_dfa():
    with pytest.raises(ValueError, match="that is method='dfa'"):
        SALConfig(method="sal", num_areas=1)


def test_area_feedback_needs_several_areas():
    with pytest.raises(ValueError, match="feedback='area' needs several areas"):
        SALConfig(method="bp", feedback="area")


@pytest.mark.parametrize(
    "field, value", [("routing_dim", 0), ("feedback_rank", 0), ("feedback_blocks", 0),
                     ("router_temperature", 0.0), ("feedback_scale", -1.0),
                     ("router_momentum", 1.0)],
)
def test_out_of_range_numbers_are_rejected(field, value):
    with pytest.raises(ValueError, match=f"SALConfig.{field}"):
        SALConfig(**{field: value})


def test_feedback_blocks_must_divide_the_rank():
    with pytest.raises(ValueError, match="feedback_blocks=3 must divide feedback_rank=64"):
        SALConfig(feedback_rank=64, feedback_blocks=3)


def test_dict_round_trip_and_unknown_fields():
    config = SALConfig(num_areas=8, routing="token", feedback="area", feedback_rank=64)
    assert SALConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"Unknown SALConfig fields \['areas'\]"):
        SALConfig.from_dict({"areas": 3})


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "0"])
def test_seed_outside_what_torch_generators_take_is_rejected(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        SALConfig(seed=seed)


@pytest.mark.parametrize(
    "field, value, message",
    [("balance_loss_weight", float("inf"), "must be finite"),
     ("router_temperature", float("nan"), "must be finite"),
     ("feedback_scale", "0.5", "must be a real number, got '0.5' \\(str\\)"),
     ("prototype_loss_weight", True, "must be a real number")],
)
def test_float_settings_must_be_finite_real_numbers(field, value, message):
    with pytest.raises(ValueError, match=f"SALConfig.{field} {message}"):
        SALConfig(**{field: value})


def test_an_integer_float_setting_is_stored_as_a_float():
    config = SALConfig(balance_loss_weight=2)
    assert config.balance_loss_weight == 2.0 and isinstance(config.balance_loss_weight, float)


def test_shared_path_takes_a_bool_only():
    with pytest.raises(ValueError, match="shared_path must be True or False, got 'no'"):
        SALConfig(shared_path="no")


def test_backprop_with_per_area_feedback_contradicts_itself():
    with pytest.raises(ValueError, match="method='bp' trains by backprop and uses no feedback"):
        SALConfig(method="bp", num_areas=4, feedback="area")


def test_one_routing_dimension_cannot_reach_every_area():
    with pytest.raises(ValueError, match="routing_dim=1 cannot route among num_areas=4"):
        SALConfig(num_areas=4, routing_dim=1)
    assert SALConfig(num_areas=8, routing_dim=2).routing_dim == 2  # fewer dims than areas is fine


def test_numpy_integers_are_accepted_and_stored_as_ints():
    import json

    import numpy as np

    config = SALConfig(num_areas=np.int64(4), routing_dim=np.int32(8), seed=np.int64(3))
    assert (config.num_areas, config.routing_dim, config.seed) == (4, 8, 3)
    assert all(type(v) is int for v in (config.num_areas, config.routing_dim, config.seed))
    assert SALConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="num_areas must be an integer >= 1"):
        SALConfig(num_areas=np.bool_(True))


def test_a_router_temperature_below_float32s_range_is_rejected():
    # Cosines divided by 1e-320 overflow in float32 and the balance softmax gives NaN.
    with pytest.raises(ValueError, match=r"router_temperature must be at least 1\.17.*e-38"):
        SALConfig(router_temperature=1e-320)
    assert SALConfig(router_temperature=2.0**-126).router_temperature == 2.0**-126


def test_the_float32_bound_is_torchs():
    import torch

    from sal_hf.config import _FLOAT32_TINY

    assert _FLOAT32_TINY == torch.finfo(torch.float32).tiny
