import json

import pytest

from fastdca import DCAConfig


def test_defaults_are_the_papers_with_the_studys_causal_loss():
    config = DCAConfig()
    assert (config.adapter_layers, config.adapter_len, config.causal_len, config.alpha) == (20, 10, 2, 1.0)
    assert config.causal_layers == 20
    assert (config.gate_fn, config.variance, config.xg_space) == ("tanh", "token", "hidden")


def test_round_trips_through_dict_and_json():
    config = DCAConfig(adapter_layers=8, adapter_len=4, causal_len=4, causal_layers=3, alpha=0.5,
                       gate_fn="identity", variance="token", xg_space="hidden",
                       variance_scope="rank")
    assert DCAConfig.from_dict(config.to_dict()) == config
    assert DCAConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["causal_layers"] == 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(adapter_layers=0), r"adapter_layers must be a positive integer"),
    (dict(adapter_layers=2.5), r"adapter_layers must be a positive integer"),
    (dict(adapter_len=-1), r"adapter_len must be a positive integer"),
    (dict(adapter_len=True), r"adapter_len must be a positive integer"),
    (dict(adapter_len=4, causal_len=5), r"causal_len must be an integer in \[0, adapter_len=4\]"),
    (dict(causal_len=-1), r"causal_len must be an integer"),
    (dict(adapter_layers=5, causal_layers=6), r"causal_layers must be an integer in \[1, adapter_layers=5\]"),
    (dict(causal_layers=0), r"causal_layers must be an integer"),
    (dict(alpha=-0.1), r"alpha must be a number >= 0"),
    (dict(alpha=float("nan")), r"alpha must be a number >= 0"),
    (dict(alpha="1"), r"alpha must be a number >= 0"),
    (dict(gate_fn="sigmoid"), r"gate_fn must be one of \('tanh', 'identity'\)"),
    (dict(variance="batch"), r"variance must be one of \('sample', 'token'\)"),
    (dict(xg_space="output"), r"xg_space must be one of \('head', 'hidden'\)"),
    (dict(variance_scope="node"), r"variance_scope must be one of \('global', 'rank'\)"),
])
def test_invalid_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DCAConfig(**kwargs)


def test_unknown_field_in_dict_is_refused():
    with pytest.raises(ValueError, match=r"unknown fields \['adapter_size'\]"):
        DCAConfig.from_dict({"adapter_size": 3})
