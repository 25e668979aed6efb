"""Shared test utilities: small training settings built from the real Hydra configs."""

from __future__ import annotations

from conftest import compose_config


def small_settings(config: str, system_cls, overrides: list[str], results_dir: str):
    from systems.settings import load_settings

    base = [
        "arch.num_evaluation=2",
        "arch.num_eval_episodes=8",
        "arch.num_absolute_metric_eval_episodes=8",
        "arch.absolute_metric=false",
        "logger.progress=false",
        "logger.plot=false",
        f"logger.base_dir={results_dir}",
    ]
    return load_settings(compose_config(config, base + overrides), system_cls)


def bypassed_gru_nets(settings, spec):
    """The recurrent networks ``network.*`` asks for with the GRU replaced by the identity."""
    from networks.policy import recurrent
    from networks.recurrent import make_recurrent_actor_critic

    net = settings.network
    return recurrent(make_recurrent_actor_critic(
        spec, pre_layers=net.rnn_pre_layers, hidden_size=net.rnn_hidden_size, post_layers=net.rnn_post_layers,
        activation=net.activation, use_layer_norm=net.use_layer_norm, parameter_sharing=net.parameter_sharing,
        add_agent_id=net.add_agent_id, centralised_critic=settings.system.centralised_critic, use_gru=False))


def rec_to_ff(rec):
    """Recurrent params (pre [n] -> bypassed GRU -> post [n] -> head) as the FF MLP [n, n] tree."""
    inner = dict(rec["head"]["params"]["head"])
    torso = {"Dense_0": rec["pre"]["params"]["Dense_0"], "Dense_1": inner["torso"]["Dense_0"]}
    return {"params": {**inner, "torso": torso}}


def assert_same_metrics(got, want, names=("actor_loss", "value_loss", "entropy", "return_sum", "count")):
    """Per-update metrics of two equivalent systems agree (float tolerance)."""
    import numpy as np

    for name in names:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=2e-4, atol=2e-5, err_msg=name)


def assert_identical_on_devices(tree, devices: int | None = None, err_msg: str = "") -> None:
    """Every leaf of a replicated pytree holds bit-identical data on each of its devices (and, with
    ``devices``, on exactly that many)."""
    import jax
    import numpy as np

    for leaf in jax.tree.leaves(tree):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        if devices is not None:
            assert len(shards) == devices, (len(shards), err_msg)
        for shard in shards[1:]:
            np.testing.assert_array_equal(shards[0], shard, err_msg=err_msg)
