"""Pure RL math: masked statistics, advantages, KL estimators, policy and value losses."""
