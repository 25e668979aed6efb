"""Bad input fails before compilation with a message naming the key, the value and what is allowed."""

import pytest
from conftest import compose_config

from systems.ppo import PPOConfig
from systems.settings import load_settings
from utils.config import ConfigError


def settings(overrides, devices=2):
    return load_settings(compose_config("mappo", overrides), PPOConfig, available_devices=devices)


def test_defaults_are_valid_and_derive_sizes():
    s = settings([])
    assert s.envs_per_device == 16 and s.num_devices == 2
    assert s.num_updates == 2_000_000 // (128 * 32)
    assert s.num_updates_per_eval == s.num_updates // 20


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (["env.task=9x9-nope"], ["env.task", "9x9-nope", "8x8-2p-2f-coop"]),
        (["env.name=starcraft"], ["env.name", "starcraft", "rware"]),
        (["arch.num_envs=33"], ["arch.num_envs", "33", "divisible", "2"]),
        (["system.num_minibatches=3"], ["system.num_minibatches", "3", "128 * 16"]),
        (["+system.learning_rate=1"], ["system.learning_rate", "valid keys", "actor_lr"]),
        (["system.gamma=1.5"], ["system.gamma", "1.5", "[0, 1]"]),
        (["network.parameter_sharing=some"], ["network.parameter_sharing", "some", "separate"]),
        (["arch.total_timesteps=100"], ["arch.total_timesteps", "100", "num_evaluation"]),
        (["system.clip_eps=abc"], ["system.clip_eps", "abc", "number"]),
        (["logger.algorithm_name=' '"], ["logger.algorithm_name", "non-empty"]),
        (["arch.process_id=1"], ["arch.process_id", "1", "arch.distributed=true"]),
        (["arch.distributed=true", "arch.num_processes=2", "arch.process_id=2"], ["arch.process_id", "2", "0..1"]),
        (["arch.distributed=true", "arch.num_processes=0"], ["arch.num_processes", "0", "> 0"]),
    ],
)
def test_errors_name_key_value_and_allowed(overrides, needles):
    with pytest.raises(ConfigError) as err:
        settings(overrides)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_more_devices_than_available_is_rejected():
    with pytest.raises(ConfigError, match="arch.num_devices"):
        settings(["arch.num_devices=4"], devices=2)


def test_the_results_name_says_network_kind_system_and_sharing():
    assert settings([]).algorithm_label == "ff_mappo_shared"
    assert settings(["network=rnn", "network.parameter_sharing=separate"]).algorithm_label == "rec_mappo_separate"
    assert settings(["logger.algorithm_name=mappo_lr3e-4"]).algorithm_label == "mappo_lr3e-4"


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (["env=smax", "env.kwargs.world_state=raw"], ["env.kwargs.world_state", "'raw'", "jaxmarl, scaled"]),
        (["env=smax", "+env.kwargs.fog=1"], ["env.kwargs", "fog", "unexpected keyword"]),
    ],
)
def test_env_kwargs_the_env_rejects_are_config_errors(overrides, needles):
    """The env checks its own keywords while it is built, before compilation."""
    from systems.anakin import make_envs

    with pytest.raises(ConfigError) as err:
        make_envs(settings(overrides))
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
