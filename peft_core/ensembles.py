"""Prediction diversity of PEFT methods and output-space ensembles of them.

Pure functions over per-sample predictions (numpy arrays; pandas only for the
labelled matrices); no torch, no file access. The workflow stage that reads
the cells and renders the report is :mod:`peft_core.ensemble_report`.

Following Mai et al. (CVPR 2025, arXiv 2409.16434), who find that tuned PEFT
methods reach similar accuracy but make different mistakes and different
high-confidence predictions, and ensemble them. Definitions, for two methods
``a`` and ``b`` evaluated on the same ``n`` samples with labels ``y``:

* **disagreement** = |{i : pred_a[i] != pred_b[i]}| / n.
* **error overlap** = |E_a ∩ E_b| / |E_a ∪ E_b| with E_m = {i : pred_m[i] != y[i]}
  (Jaccard index of the two error sets; 1 = identical mistakes, 0 = disjoint
  mistakes; NaN when neither method makes a mistake).
* **high-confidence overlap / agreement**, at a fraction ``q``: H_m is the set
  of the k = ceil(q·n) samples with the highest softmax confidence
  max_c softmax(logits_m[i])_c (ties: lower sample position first).
  overlap = |H_a ∩ H_b| / k (do both methods find the same samples easy?);
  agreement = fraction of H_a ∩ H_b where pred_a == pred_b (NaN if empty).
  A rank-based set, rather than a fixed probability threshold, because the
  methods' confidences are not calibrated alike.

Ensemble rules over any set of members (each a ``(n, classes)`` logit array):

* ``softmax_average``: argmax of the mean of the members' softmax
  probabilities (the usual deep-ensemble average; averaging probabilities,
  not raw logits, keeps a member with large logit scale from dominating).
* ``majority_vote``: each member votes for its argmax class; the class with
  most votes wins; a tie between classes is broken by the higher summed
  softmax probability over all members, then by the lower class index.

Selection of the members (:func:`greedy_select`) sees validation predictions
only; the chosen set is then scored on the final (test) runs seed by seed
(:func:`seed_matched_accuracy`): for each final seed, the members' runs with
that seed are ensembled, and the accuracies are averaged over seeds by the
caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np
import pandas as pd

Rule = Literal["softmax_average", "majority_vote"]
RULES: tuple[Rule, ...] = ("softmax_average", "majority_vote")
T = TypeVar("T")


# ------------------------------------------------------------------ basics


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(n, classes)`` logits, numerically stable, float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples with ``pred == labels`` (NaN for zero samples)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    return float((pred == labels).mean()) if len(labels) else math.nan


def disagreement(pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    """Fraction of samples on which the two predictions differ."""
    pred_a, pred_b = np.asarray(pred_a), np.asarray(pred_b)
    return float((pred_a != pred_b).mean()) if len(pred_a) else math.nan


def error_overlap(pred_a: np.ndarray, pred_b: np.ndarray, labels: np.ndarray) -> float:
    """Jaccard index of the error sets: |both wrong| / |either wrong| (NaN if neither errs)."""
    wrong_a = np.asarray(pred_a) != np.asarray(labels)
    wrong_b = np.asarray(pred_b) != np.asarray(labels)
    either = int((wrong_a | wrong_b).sum())
    return int((wrong_a & wrong_b).sum()) / either if either else math.nan


def top_confident(probs: np.ndarray, q: float) -> np.ndarray:
    """Positions of the ceil(q·n) most confident samples (max probability; ties: lower position)."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    conf = np.asarray(probs).max(axis=1)
    k = math.ceil(q * len(conf))
    order = np.lexsort((np.arange(len(conf)), -conf))  # last key is primary: confidence desc
    return np.sort(order[:k])


@dataclass(frozen=True)
class Confident:
    """High-confidence comparison of two methods at fraction ``q`` (see module docstring)."""

    overlap: float  # |H_a ∩ H_b| / k
    agreement: float  # fraction of H_a ∩ H_b where the predictions match
    n_both: int  # |H_a ∩ H_b|
    k: int  # size of each H


def confident_agreement(probs_a: np.ndarray, probs_b: np.ndarray, q: float = 0.2) -> Confident:
    """Overlap of the two methods' top-q confident samples and agreement on those shared."""
    h_a, h_b = top_confident(probs_a, q), top_confident(probs_b, q)
    both = np.intersect1d(h_a, h_b)
    k = len(h_a)
    pa, pb = np.asarray(probs_a)[both].argmax(1), np.asarray(probs_b)[both].argmax(1)
    return Confident(
        overlap=len(both) / k if k else math.nan,
        agreement=float((pa == pb).mean()) if len(both) else math.nan,
        n_both=len(both),
        k=k,
    )


def pairwise_matrix(items: Mapping[str, T], fn: Callable[[T, T], float]) -> pd.DataFrame:
    """Symmetric method x method frame of ``fn(items[a], items[b])``, in ``items`` order."""
    names = list(items)
    out = pd.DataFrame(np.nan, index=names, columns=names, dtype=float)
    for i, a in enumerate(names):
        for b in names[i:]:
            out.loc[a, b] = out.loc[b, a] = fn(items[a], items[b])
    return out


def disagreement_matrix(preds: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Pairwise disagreement of class predictions (diagonal 0)."""
    return pairwise_matrix(preds, disagreement)


def error_overlap_matrix(preds: Mapping[str, np.ndarray], labels: np.ndarray) -> pd.DataFrame:
    """Pairwise error-set Jaccard (diagonal 1, or NaN for an error-free method)."""
    return pairwise_matrix(preds, lambda a, b: error_overlap(a, b, labels))


# ------------------------------------------------------------------ ensembles


def softmax_average(logits: Sequence[np.ndarray]) -> np.ndarray:
    """Predicted classes: argmax of the members' mean softmax probability."""
    if not logits:
        raise ValueError("an ensemble needs at least one member")
    return np.mean([softmax(z) for z in logits], axis=0).argmax(axis=1)


def majority_vote(logits: Sequence[np.ndarray]) -> np.ndarray:
    """Predicted classes by plurality vote; ties: higher summed probability, then lower class."""
    if not logits:
        raise ValueError("an ensemble needs at least one member")
    probs = [softmax(z) for z in logits]
    n, classes = probs[0].shape
    votes = np.zeros((n, classes), dtype=np.int64)
    for p in probs:
        votes[np.arange(n), p.argmax(axis=1)] += 1
    summed = np.sum(probs, axis=0)
    # Among the classes with the most votes, the highest summed probability;
    # argmax returns the first (lowest) class on an exact tie.
    tied = votes == votes.max(axis=1, keepdims=True)
    return np.where(tied, summed, -np.inf).argmax(axis=1)


def ensemble_predict(logits: Sequence[np.ndarray], rule: Rule) -> np.ndarray:
    """Class predictions of the ensemble of ``logits`` under ``rule``."""
    if rule == "softmax_average":
        return softmax_average(logits)
    if rule == "majority_vote":
        return majority_vote(logits)
    raise ValueError(f"unknown ensemble rule {rule!r}; expected one of {RULES}")


@dataclass(frozen=True)
class Greedy:
    """Outcome of :func:`greedy_select`: members in the order added, and each step's accuracy."""

    members: tuple[str, ...]
    accuracy: float  # of the final member set, on the selection (validation) split
    trace: list[tuple[tuple[str, ...], float]] = field(default_factory=list)


def greedy_select(
    val_logits: Mapping[str, np.ndarray],
    val_labels: np.ndarray,
    rule: Rule,
    max_members: int | None = None,
) -> Greedy:
    """Greedy forward selection of ensemble members on validation predictions only.

    Start from the method with the best validation accuracy; then repeatedly add
    the method whose addition gives the highest validation accuracy of the
    ensemble, while that accuracy strictly improves (each method at most once,
    at most ``max_members``). Ties: the method listed first in ``val_logits``.
    Test predictions are not an argument, so they can not influence the choice.
    """
    if not val_logits:
        raise ValueError("greedy selection needs at least one method")
    names = list(val_logits)
    single = {m: accuracy(val_logits[m].argmax(axis=1), val_labels) for m in names}
    first = max(names, key=lambda m: (single[m], -names.index(m)))
    members, best = [first], single[first]
    trace = [((first,), best)]
    limit = len(names) if max_members is None else max_members
    while len(members) < limit:
        scores = {
            m: accuracy(ensemble_predict([val_logits[x] for x in (*members, m)], rule), val_labels)
            for m in names
            if m not in members
        }
        if not scores:
            break
        cand = max(scores, key=lambda m: (scores[m], -names.index(m)))
        if not scores[cand] > best:
            break
        members.append(cand)
        best = scores[cand]
        trace.append((tuple(members), best))
    return Greedy(members=tuple(members), accuracy=best, trace=trace)


def seed_matched_accuracy(
    logits: Mapping[str, Mapping[int, np.ndarray]],
    labels: Mapping[int, np.ndarray],
    members: Sequence[str],
    rule: Rule,
) -> dict[int, float]:
    """Accuracy per seed of the ensemble of ``members``' runs with that same seed.

    ``logits[method][seed]`` are a final run's logits on the final split and
    ``labels[seed]`` its labels. Seeds where a member has no run are left out;
    the caller averages the returned accuracies over seeds.
    """
    out = {}
    for seed in sorted(labels):
        if all(seed in logits.get(m, {}) for m in members):
            pred = ensemble_predict([logits[m][seed] for m in members], rule)
            out[seed] = accuracy(pred, labels[seed])
    return out
