"""The trainer behind `train.py`: config schema, optimizer, schedules, step, checkpoints, metrics, loop."""
