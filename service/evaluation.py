"""Classification metrics: accuracy, per-label precision and recall, confusion matrix."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> np.ndarray:
    """``[true, predicted]`` counts."""
    matrix = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _ratio(num: float, den: float) -> float | None:
    return round(float(num / den), 6) if den else None


def metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """JSON-ready metrics; ``None`` where a ratio has no denominator."""
    matrix = confusion(np.asarray(y_true, int), np.asarray(y_pred, int), len(labels))
    correct = np.diag(matrix)
    per_label = {
        label: {
            "n": int(matrix[i].sum()),
            "precision": _ratio(correct[i], matrix[:, i].sum()),
            "recall": _ratio(correct[i], matrix[i].sum()),
        }
        for i, label in enumerate(labels)
    }
    return {
        "accuracy": _ratio(correct.sum(), matrix.sum()),
        "n": int(matrix.sum()),
        "per_label": per_label,
        "confusion_matrix": {"labels": list(labels), "rows_true_cols_predicted": matrix.tolist()},
    }
