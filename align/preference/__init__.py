"""Offline preference optimization: DPO and the objectives trained on the policy's own log-probs.

dpo_options (the `dpo:` section, every TRL loss option), dpo_trainer (TRL's DPOTrainer with the fast
path: prefix sharing, the on-disk reference cache), dpo_setup (that trainer built from a stage config,
for the DPO and online DPO stages), objectives (SimPO, CPO, ORPO as objects that say what they need),
objective_trainer (their trainer), losses (their pure tensor losses)."""
