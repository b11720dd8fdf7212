"""The stages: one module per method, each registering its record in align.stages.registry.

Where things live (the rule for every method, old and new):
- A stage module holds its config (the typed sections of its YAML), its record (kl_knob, curves,
  beta_key, objective or estimator, checks) and its wiring: which data it reads, which trainer or loop
  it runs, what it writes to its RunDir and the lines its summary prints. It holds no training loop.
- A training loop lives in its method package. Offline preference methods: align/preference (the DPO
  trainer with its fast path, the objective trainer of SimPO/CPO/ORPO; the HF Trainer drives them through
  the shared skeleton, align/stages/hf_training.py). Online methods: align/rlhf (PPO's steps, the group
  policy gradient of GRPO/RLOO, online DPO's rounds; their step loop and checkpoints, align/rlhf/loop.py).
  SFT, the reward model and KTO are TRL's trainers, built in their stage modules.
- What every loop sets up the same way is written once below the stages: the policy adapter
  (align/rlhf/policy.py), AdamW with its schedule, the gradient-checkpointing choice and the HF
  TrainingArguments (align/modeling/train_setup.py).
- The machinery stages share is here, in modules that are not stages: registry (the records, run_stage),
  stage_run (a run's lifecycle: inputs checked, skip/resume/fresh, RunDir, lock, tracker), hf_training
  (the HF Trainer skeleton), samples (the end-of-stage sample table), objective_run and online_run
  (the shared runs of objective methods and of the online methods).

Stages never import each other. A stage module imports only light things at module level, so configs
load and fail before torch and TRL do. Package layers: core <- modeling <- {preference, rlhf,
evaluation} <- stages <- cli (tests/test_architecture.py holds them).
"""
