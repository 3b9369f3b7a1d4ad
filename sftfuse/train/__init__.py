"""The SFT application behind `sftfuse train`: config, data, trainer, checkpoints, evaluation, adapters, CLI."""
