"""Evaluation: rule-based and reward-model judges, the comparison report, the PEFT methods comparison.

Importing the package registers the judges that need more than the rule-based module: "rm:<reward
RunDir>" (a trained reward model; torch loads only when it first scores).
"""

from align.evaluation import judges, reward_judge

judges.register_judge_prefix("rm", reward_judge.RewardModelJudge, check=reward_judge.check_spec)
