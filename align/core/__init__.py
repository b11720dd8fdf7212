"""The core every part of align stands on: the config schema and loader, errors, RunDirs and
atomic writes, tracking (W&B + metrics.jsonl) and the Trainer callbacks, checkpoints, safeguards,
memory, data loading and rows to training examples."""
