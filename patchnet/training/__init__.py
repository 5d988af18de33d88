"""A training run: the splits it reads, its state, the trainer's loop and the hooks around it, and unlocking the
trunk's top stages."""
