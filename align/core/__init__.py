"""The core every part of align stands on: the config schema and loader, errors, RunDirs and
atomic writes, tracking (W&B + metrics.jsonl), checkpoints, safeguards, and data loading."""
