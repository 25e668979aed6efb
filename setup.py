from setuptools import setup

setup(
    name="marl-anakin",
    version="0.1.0",
    description="JAX-native, end-to-end accelerated cooperative multi-agent RL (IPPO, MAPPO, "
    "CoPPO, HAPPO, A2PO, B2MAPO, Sable, MAGPO)",
    python_requires=">=3.11",
    packages=["systems", "networks", "envs", "utils"],
    install_requires=[
        "jax>=0.11.2,<0.12",
        "flax>=0.12.12,<0.13",
        "optax>=0.2.8,<0.3",
        "chex>=0.1.92,<0.2",
        "distrax>=0.1.9,<0.2",
        "jumanji>=1.1.2,<1.2",
        "orbax-checkpoint>=0.12.8,<0.13",
        "hydra-core>=1.3.2,<1.4",
        "rich>=13",
        "matplotlib>=3.8",
        "numpy>=2",
    ],
    extras_require={
        "jaxmarl": ["jaxmarl==0.2.0"],
        "neptune": ["neptune>=1.10,<2"],
        "dev": ["pytest>=8", "pytest-xdist>=3.2"],
    },
)
