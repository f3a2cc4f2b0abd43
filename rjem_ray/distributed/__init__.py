"""The distributed layer: Ray setup, the Ray Train driver and worker, the replay buffer's shard actors, the step-time model of N workers."""
