"""SamplingParams: vLLM's defaults, normalisation, and a clear error for every bad value."""

import dataclasses
import math

import numpy as np
import pytest

from llmopt.runtime.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (16, 1.0, 0, 1.0, None)
    assert (p.stop, p.stop_token_ids) == ((), ())
    assert (p.ignore_eos, p.skip_special_tokens, p.include_stop_str_in_output, p.n) == (False, True, False, 1)
    assert not p.greedy


def test_greedy():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-6).greedy  # too small to divide by: argmax, as vLLM
    assert not SamplingParams(temperature=0.01).greedy


@pytest.mark.parametrize("stop, expected", [
    (None, ()),
    ("###", ("###",)),
    (["a", "bc"], ("a", "bc")),
    (("\n\n",), ("\n\n",)),
    ([], ()),
])
def test_stop_is_normalised_to_a_tuple(stop, expected):
    assert SamplingParams(stop=stop).stop == expected


def test_stop_token_ids_are_normalised_to_a_tuple():
    assert SamplingParams(stop_token_ids=[2, np.int64(7)]).stop_token_ids == (2, 7)
    assert SamplingParams(stop_token_ids=None).stop_token_ids == ()


def test_numbers_become_plain_python_numbers():
    p = SamplingParams(temperature=1, top_p=np.float32(0.5), top_k=np.int64(3), seed=np.int64(4))
    assert type(p.temperature) is float and p.temperature == 1.0
    assert type(p.top_p) is float and type(p.top_k) is int and type(p.seed) is int


def test_frozen_and_replace_validates_again():
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.0
    assert dataclasses.replace(p, temperature=0.0).greedy
    with pytest.raises(ValueError, match="temperature"):
        dataclasses.replace(p, temperature=-1.0)


@pytest.mark.parametrize("name, value", [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 1.5), ("max_tokens", True), ("max_tokens", "16"),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", True),
    ("temperature", "1.0"),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.01), ("top_p", math.nan), ("top_p", False),
    ("seed", 1.5), ("seed", True), ("seed", "7"), ("seed", 2**64), ("seed", -(2**63) - 1),
    ("stop", ""), ("stop", ["ok", ""]), ("stop", [1]), ("stop", 5), ("stop", {"a"}),
    ("stop_token_ids", [-1]), ("stop_token_ids", [True]), ("stop_token_ids", 3), ("stop_token_ids", [1.0]),
    ("ignore_eos", 1), ("skip_special_tokens", None), ("include_stop_str_in_output", "yes"),
    ("n", 2), ("n", 0), ("n", True),
])
def test_bad_values_name_the_parameter_and_the_value(name, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{name: value})
    message = str(info.value)
    assert message.startswith(f"SamplingParams.{name} must be ")
    assert f"got {value!r}" in message


def test_edge_values_accepted():
    SamplingParams(max_tokens=None, top_k=-1, top_p=1.0, seed=-1, temperature=0.0)
    SamplingParams(max_tokens=1, top_k=1, top_p=1e-9, seed=2**64 - 1)
