"""The radiomics logistic regression fitted as a convex problem (scikit-learn, L-BFGS, to convergence).

Its inverse regularisation C is chosen from C_GRID by the lowest log-loss (mean cross-entropy; unlike AUC it is defined
for any number of nodules and classes): on the validation split in an ordinary run; in cross-validation
(data.cv_fold >= 0, where the validation split is the held-out fold) on out-of-fold probabilities of a patient-grouped
k-fold over the training records, so the held-out fold is never seen. Ties go to the smaller C (the stronger
regularisation). The fitted weights are written into `RadiomicsLogReg.classifier`.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

from autorad_jax.errors import AutoradError
from autorad_jax.models.baselines import RadiomicsLogReg

C_GRID = tuple(float(c) for c in np.logspace(-3, 3, 7))
INNER_FOLDS = 5
MAX_ITER = 10_000
TOL = 1e-8  # L-BFGS stops when the projected gradient is below this: converged, not merely close


class ConvexFitError(AutoradError, RuntimeError):
    """The logistic regression did not converge, or its data cannot be fitted."""


def fit(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    """L-BFGS logistic regression (multinomial for 3+ classes) of labels y on features x; ConvexFitError unless it
    converged."""
    if len(np.unique(y)) < 2:
        raise ConvexFitError(f"The logistic regression needs two classes in its training labels; they hold only "
                             f"{np.unique(y).tolist()}.")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            # float64: scikit-learn would optimise float32 features in float32, short of TOL
            clf = LogisticRegression(C=c, solver="lbfgs", max_iter=MAX_ITER, tol=TOL)
            return clf.fit(np.asarray(x, np.float64), y)
        except ConvergenceWarning as e:
            raise ConvexFitError(f"The logistic regression with C={c:g} did not converge in {MAX_ITER} "
                                 f"L-BFGS iterations: {e}") from e


def class_probabilities(clf: LogisticRegression, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities [N, num_classes]; a class absent from clf's training labels gets 0."""
    probs = np.zeros((len(x), num_classes))
    probs[:, clf.classes_] = clf.predict_proba(x)
    return probs


def log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean -log p(true class), each probability clipped to at least 1e-15."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-15, None))))


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, groups: np.ndarray, c: float,
                              num_classes: int) -> np.ndarray:
    """Probabilities of every record from a fit on the other patient groups (GroupKFold, INNER_FOLDS or fewer). Where
    those hold a single class, every C predicts that class alone."""
    probs = np.zeros((len(y), num_classes))
    splits = GroupKFold(n_splits=min(INNER_FOLDS, len(np.unique(groups))))
    for fit_rows, held_rows in splits.split(x, y, groups):
        if len(np.unique(y[fit_rows])) < 2:
            probs[held_rows, y[fit_rows][0]] = 1.0
        else:
            probs[held_rows] = class_probabilities(fit(x[fit_rows], y[fit_rows], c), x[held_rows], num_classes)
    return probs


def choose_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, num_classes: int,
             validation: tuple[np.ndarray, np.ndarray] | None) -> tuple[float, list[float]]:
    """(chosen C, log-loss of each C of C_GRID): on `validation` (x, y) when given, else out of fold on patient
    groups of the training records."""
    scores = []
    for c in C_GRID:
        if validation is None:
            scores.append(log_loss(y, out_of_fold_probabilities(x, y, groups, c, num_classes)))
        else:
            scores.append(log_loss(validation[1], class_probabilities(fit(x, y, c), validation[0], num_classes)))
    return C_GRID[int(np.argmin(scores))], scores


def linear_weights(clf: LogisticRegression, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(kernel [F, C], bias [C]) of a softmax layer giving clf's probabilities. Binary sklearn models hold one logit
    difference: it becomes the second class's logit, the first's is 0. A class absent from the training labels gets
    a logit far below the others."""
    coef, intercept = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:
        coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    kernel = np.zeros((coef.shape[1], num_classes))
    bias = np.full(num_classes, -1e4)
    kernel[:, clf.classes_], bias[clf.classes_] = coef.T, intercept
    return kernel.astype(np.float32), bias.astype(np.float32)


def fit_radiomics_logreg(model: RadiomicsLogReg, x: np.ndarray, y: np.ndarray, groups: np.ndarray,
                         validation: tuple[np.ndarray, np.ndarray] | None) -> dict:
    """Chooses C (see `choose_c`), fits on all of (x, y) and writes the weights into model.classifier in place.
    Returns {'C', 'grid', 'log_loss' (per C), 'selection', 'n_iter'}, for the run's convex_fit.json."""
    num_classes = model.classifier.out_features
    c, scores = choose_c(x, y, groups, num_classes, validation)
    clf = fit(x, y, c)
    kernel, bias = linear_weights(clf, num_classes)
    model.classifier.kernel[...] = kernel
    model.classifier.bias[...] = bias
    return {"C": c, "grid": list(C_GRID), "log_loss": scores, "n_iter": int(np.max(clf.n_iter_)),
            "selection": "validation split" if validation is not None else
            f"patient-grouped {INNER_FOLDS}-fold over the training records"}
