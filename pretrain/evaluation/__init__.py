"""What the model learned, measured during training and on a finished run.

- eval_loss: the eval loss, perplexity and bits per byte over a fixed set of held-out sequences.
- tasks: downstream tasks (eval.tasks) loaded, checked and tokenized once: local JSONL or Hub adapters.
- task_scoring: the tasks' items scored by log-likelihood, batched, on P processes.
"""
