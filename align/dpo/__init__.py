"""DPO internals: the trainer with the fast path (prefix sharing, the on-disk reference cache)."""
