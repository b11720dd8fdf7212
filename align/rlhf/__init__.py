"""Online methods: their loops and what the loops share.

PPO (ppo_model: policy, value and reward adapters of one base; ppo: one step and the loop), the group
policy gradient of GRPO/RLOO (group, with the estimators of estimators and the prompt-shared log-probs
of group_rows), online DPO (online_dpo: the rounds; rounds: a round's samples, pairs and files), and the
shared parts: the policy set-up (policy), the step loop and checkpoints (loop), reward sources (rewards,
options), rollouts (rollout), several processes (distributed), the best adapter within a KL budget
(keep_best), and the pure losses (losses)."""
