"""The model side: resolving and loading models and tokenizers, PEFT methods and adapters
(merge, combine, adapter sets), chat templates, generation, model cards, reward scoring and batched
log-probs (scoring: one implementation), and the training set-up every loop shares (train_setup)."""
