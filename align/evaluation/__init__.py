"""Evaluation: rule-based and reward-model judges, metrics, the policies of one base, the reward-vs-KL
frontier, degeneration checks, lm-evaluation-harness benchmarks, and the comparison report.

Importing the package registers the judges that need more than the rule-based module: "rm:<reward
RunDir>" (a trained reward model; torch loads only when it first scores).
"""

from align.evaluation import judges, reward_judge

judges.register_judge_prefix("rm", reward_judge.RewardModelJudge, check=reward_judge.check_spec)
