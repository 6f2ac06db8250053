"""Catalyst callbacks cvkit adds: freezing with a BatchNorm policy, per-group LR logging, schedulers, checkpoints."""
