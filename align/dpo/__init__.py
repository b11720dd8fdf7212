"""Offline preference optimization internals: the DPO trainer with its fast path (prefix sharing,
the on-disk reference cache), DPO's loss options (options), the reference-free losses (losses) and
trainer (reference_free) of SimPO, CPO and ORPO."""
