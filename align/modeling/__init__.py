"""The model side: resolving and loading models and tokenizers, PEFT methods and adapters
(merge, combine, adapter sets), chat templates, generation, model cards."""
