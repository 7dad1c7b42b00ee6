"""Training: job config, distributed set-up, parallel strategies, checkpoints, metrics, the step."""
