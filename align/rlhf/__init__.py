"""RLHF: pure loss and advantage functions, reward scoring, and the PPO machinery."""
