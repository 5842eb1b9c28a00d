"""Evaluation with lm-eval: the adapter over our runtimes and engine (adapter.py), log-likelihood
scoring (scoring.py), task discovery (tasks.py) and the run itself (evaluate.py). lm_eval is imported
only inside the functions that need it."""
