"""GLUE metrics of predictions gathered from every rank, computed by the maintained
implementations (scikit-learn, SciPy) rather than re-derived; HF `evaluate` would fetch its
metric scripts from the hub, which offline machines cannot."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def _accuracy(preds: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score

    return {"accuracy": float(accuracy_score(labels, preds))}


def _mcc(preds: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import matthews_corrcoef

    return {"mcc": float(matthews_corrcoef(labels, preds)), **_accuracy(preds, labels)}


def _acc_f1(preds: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import f1_score

    return {**_accuracy(preds, labels), "f1": float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0.0))}


def _pearson_spearman(preds: np.ndarray, labels: np.ndarray) -> dict:
    """Correlations are undefined for fewer than two rows or a constant side: NaN, as SciPy says."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_squared_error

    result = {"eval_loss": float(mean_squared_error(labels, preds))}
    if len(preds) < 2:
        return {**result, "pearson": math.nan, "spearman": math.nan}
    return {**result, "pearson": float(pearsonr(preds, labels).statistic), "spearman": float(spearmanr(preds, labels).statistic)}


@dataclass(frozen=True)
class Metric:
    task: str  # 'cls': preds and labels are class ids; 'reg': real numbers
    compute: Callable[[np.ndarray, np.ndarray], dict]


METRICS = {
    "accuracy": Metric("cls", _accuracy),
    "mcc": Metric("cls", _mcc),
    "acc_f1": Metric("cls", _acc_f1),
    "pearson_spearman": Metric("reg", _pearson_spearman),
}
DEFAULT_METRIC = {"cls": "accuracy", "reg": "pearson_spearman"}


def check_metric(metric: str, labels: dict[str, int]) -> None:
    """acc_f1's F1 is of class 1 against the rest: a run with other than two classes is refused
    before training, not at its first evaluation."""
    if metric == "acc_f1" and len(labels) != 2:
        raise ValueError(f"metric acc_f1 reports the F1 of class 1 of a binary task, but the training labels are {len(labels)} classes "
                         f"({', '.join(labels)}): use --metric accuracy or mcc")


def compute(metric: str, preds, labels) -> dict:
    """The metric set `metric` (a METRICS key) of all rows' predictions and labels."""
    return METRICS[metric].compute(np.asarray(preds), np.asarray(labels))
