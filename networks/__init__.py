"""Actor and critic networks. Heads return arrays; distributions are built from them in losses."""

from networks.base import (  # noqa: F401
    ActorCritic,
    MLPTorso,
    make_actor_critic,
)
from networks.distributions import env_action, make_distribution  # noqa: F401
