"""Evaluation results as text: retrieval laid out like the paper's Table 1, PatchDis like its Table 2.

Retrieval: one column group per dataset (image-to-text R@1/5/10, text-to-image R@1/5/10), one row per
kind of vector, in percent; then the mean active words per image / text of each sparse kind and the word
precision of images and captions next to random words' (when the evaluator computed it). PatchDis:
one row per set, per-image mIoU first, each number beside the random assignment's under the same protocol.
Zero-shot classification: acc@1, acc@5 and mean per-class recall per set and kind of vector, and random's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lexvla_jax.evaluate.base import Evaluator
from lexvla_jax.evaluate.patchdis import confusion_table
from lexvla_jax.evaluate.retrieval import MODES

NUMBER_WIDTH = 6
GAP = "   "
DIRECTIONS = ("image-to-text", "text-to-image")


def mode_label(mode: str, settings: Mapping) -> str:
    if mode == "threshold":
        return "≥ 1/√V′" if settings["threshold"] is None else f"≥ {settings['threshold']:g}"
    if mode == "topk":
        return f"top-{settings['top_k']}"
    return mode


def _cell(metrics: Mapping[str, float], key: str) -> str:
    return f"{100 * metrics[key]:.1f}".rjust(NUMBER_WIDTH) if key in metrics else "-".rjust(NUMBER_WIDTH)


def _columns(lines: list[list[str]]) -> str:
    """Cells in columns: the first left-aligned, the others (numbers and their heads) right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join([line[0].ljust(widths[0]), *(c.strip().rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))])
        for line in lines
    )


def retrieval_table(evaluators: Sequence[Evaluator], metrics: Mapping[str, float]) -> str:
    """Paper Table 1's layout: datasets side by side, I→T and T→I R@K per row of vector kind."""
    modes = [m for m in MODES if any(m in e.modes for e in evaluators)]
    labels = {}
    for m in modes:
        names = {mode_label(m, e.settings) for e in evaluators if m in e.modes}
        labels[m] = names.pop() if len(names) == 1 else m
    left = max(len("Retrieval (%)"), *(len(label) for label in labels.values()))
    dataset_line, direction_line, k_line = ["Retrieval (%)".ljust(left)], [" " * left], ["vectors".ljust(left)]
    rows = {m: [labels[m].ljust(left)] for m in modes}
    for e in evaluators:
        width = max(len(e.ks) * (NUMBER_WIDTH + 1) - 1, *map(len, DIRECTIONS))
        dataset_line.append(e.label.ljust(2 * width + len(GAP)))
        direction_line.append(GAP.join(d.ljust(width) for d in DIRECTIONS))
        k_line.append(GAP.join(" ".join(f"R@{k}".rjust(NUMBER_WIDTH) for k in e.ks).ljust(width) for _ in DIRECTIONS))
        for m in modes:
            cells = [[_cell(metrics, f"{e.name}/{m}/{d}_r@{k}") for k in e.ks] for d in ("i2t", "t2i")]
            rows[m].append(GAP.join(" ".join(c).ljust(width) for c in cells))
    lines = [GAP.join(line).rstrip() for line in (dataset_line, direction_line, k_line, *rows.values())]
    for e in evaluators:
        words = []
        for m in e.modes:
            key = f"{e.name}/{m}/active_words_image"
            if key in metrics:
                text = metrics[f"{e.name}/{m}/active_words_text"]
                words.append(f"{mode_label(m, e.settings)} {metrics[key]:.1f} / {text:.1f}")
        if words:
            lines.append(f"active words per image / text, {e.label}: " + ", ".join(words))
        if f"{e.name}/word_precision/image" in metrics:
            w = {
                k: 100 * metrics[f"{e.name}/word_precision/{k}"]
                for k in ("image", "image_random", "text", "text_random")
            }
            lines.append(
                f"word precision@{e.settings['word_k']} (%), {e.label}: images {w['image']:.1f} "
                f"(random {w['image_random']:.1f}), captions {w['text']:.1f} (random {w['text_random']:.1f})"
            )
    return "\n".join(lines)


def patchdis_table(evaluators: Sequence[Evaluator], metrics: Mapping[str, float]) -> str:
    """Paper Table 2's numbers per set: per-image mIoU first (the protocol the paper's random 5.0 matches), then the
    set-level mIoU and the mean class recall, each beside a random assignment scored the same way."""
    lines = [["PatchDis (%)", "classes", "mIoU/image", "random", "mIoU/set", "random", "recall", "random"]]
    for e in evaluators:
        prefix = f"{e.name}/"
        line = [e.label, str(len(e.classes))]
        for key in ("miou_per_image", "miou", "mean_class_recall"):
            line += [_cell(metrics, prefix + key), _cell(metrics, prefix + "random_" + key)]
        lines.append(line)
    out = _columns(lines)
    for e in evaluators:
        prefix = f"{e.name}/"
        if prefix + "top_class" in metrics:
            out += (
                f"\n{e.label}: on {int(metrics[prefix + 'top_class_images'])} one-class images the image's own class "
                f"ranks first {100 * metrics[prefix + 'top_class']:.1f}% (random "
                f"{100 * metrics[prefix + 'random_top_class']:.1f}%)\n" + confusion_table(metrics, prefix, e.classes)
            )
    return out


def classification_table(evaluators: Sequence[Evaluator], metrics: Mapping[str, float]) -> str:
    """Zero-shot classification: one row per set and kind of vector (acc@1, acc@5, mean per-class recall), then a
    uniformly random ranking's."""
    lines = [["Zero-shot (%)", "classes", "vectors", "acc@1", "acc@5", "recall"]]
    keys = ("acc1", "acc5", "mean_per_class_recall")
    for e in evaluators:
        rows = [(mode_label(m, e.settings), f"{e.name}/{m}/") for m in e.modes] + [("random", f"{e.name}/chance/")]
        for i, (label, prefix) in enumerate(rows):
            head = [e.label, str(len(e.classes))] if i == 0 else ["", ""]
            lines.append([*head, label, *(_cell(metrics, prefix + key) for key in keys)])
    return _columns(lines)


TABLES = {"retrieval": retrieval_table, "patchdis": patchdis_table, "classification": classification_table}


def format_results(evaluators: Sequence[Evaluator], metrics: Mapping[str, float]) -> str:
    """Table 1 (retrieval), Table 2 (PatchDis) and the zero-shot table, for whichever kinds of evaluator ran."""
    parts = []
    for kind, table in TABLES.items():
        chosen = [e for e in evaluators if e.type == kind]
        if chosen:
            parts.append(table(chosen, metrics))
    return "\n\n".join(parts)
