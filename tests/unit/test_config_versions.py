"""Both ends of the config topics agree on what a configuration version can be: iotmeter
refuses a reported version the registry could not keep, and a device (the simulator) refuses a
desired one iotmeter could never have published."""

from __future__ import annotations

import orjson
import pytest

from iotmeter.devicelink.acl import MAX_CONFIG_VERSION
from iotmeter.devicelink.channel import parse_reported
from iotmeter.simulator.channel import ConfigRefused, parse_config_message


def message(version: object) -> bytes:
    return orjson.dumps({"version": version, "config": {"interval_s": 5}})


@pytest.mark.parametrize("version", [0, 1, MAX_CONFIG_VERSION])
def test_versions_in_range_are_taken_on_both_ends(version: int) -> None:
    assert parse_reported(message(version)) == (version, {"interval_s": 5})
    assert parse_config_message(message(version)).version == version


@pytest.mark.parametrize("version", [-1, MAX_CONFIG_VERSION + 1, 2**63, True, 1.0, "3", None])
def test_versions_out_of_range_are_refused_on_both_ends(version: object) -> None:
    assert isinstance(parse_reported(message(version)), str)
    with pytest.raises(ConfigRefused):
        parse_config_message(message(version))
