"""The engine around the network: checkpoints, inference, evaluation, tracking, training, experiments."""
