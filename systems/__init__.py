"""Training systems: shared machinery (driver, rollout, advantages, losses) and one file per algorithm."""
