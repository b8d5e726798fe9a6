"""Evaluation: evaluators declared in `config.evals`, run during training and by `lexvla eval`.

base.py       the `Evaluator` interface and the fields every entry has
registry.py   `config.evals` → evaluators; running those due at a step
retrieval.py  image↔text R@K with dense, thresholded and top-k vectors
patchdis.py   PatchDis: patch → class assignment mIoU and its random baseline (protocol in its docstring)
metrics.py    recall@k of image↔text similarity (pure jnp)
table.py      results as the paper's Table 1 / Table 2 layouts
word_precision.py  how many of a vector's top words are content words of its captions
"""
