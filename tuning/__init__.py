"""Hyperparameter sweeps over the pretraining loop with Ray Tune."""
