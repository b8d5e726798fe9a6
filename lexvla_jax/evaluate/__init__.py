"""Evaluation: evaluators declared in `config.evals`, run during training and by `lexvla eval`.

base.py       the `Evaluator` interface and the fields every entry has
registry.py   `config.evals` → evaluators; running those due at a step
retrieval.py  image↔text R@K with dense, thresholded and top-k vectors
patchdis.py   PatchDis: patch → class assignment mIoU and its random baseline (protocol in its docstring)
classification.py  zero-shot classification: acc1 / acc5 / mean per-class recall (CLIP_benchmark's keys)
class_text.py class names → text lexical vectors (name maps, templates, their mean)
metrics.py    recall@k of image↔text similarity
word_precision.py  the share of an image's / caption's top words that are its captions' content words
table.py      results as the paper's Table 1 / Table 2 layouts and a zero-shot table
"""
