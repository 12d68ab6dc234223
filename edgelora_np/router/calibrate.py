"""Fusing the two scores into calibrated probabilities, with "no adapter" as one of the choices.

For a prompt, each candidate adapter a has an embedding score e_a (cosine to its centroid) and a
keyword score k_a (BM25, in [0, 1)); the base model has e_0, the cosine to the centroid of the
base model's card (general requests). One linear score per choice, one softmax over all:

    z_a = w_e e_a + w_k k_a                 (each candidate adapter)
    z_0 = w_e e_0 + b                       (the base model: no adapter fits)
    P(choice) = softmax(z)                  over the candidates and the base model

a conditional logit (McFadden 1974): the same three weights for every adapter, so it transfers
to adapters it never saw. Fitting it by maximum likelihood on labelled prompts is Platt
scaling (Platt 1999) generalized to many classes with a "none" class; w_e and w_k play the
role of an inverse temperature. The few labelled prompts are usually separable, where the
maximum likelihood runs off to infinite weights (probabilities of exactly 0 and 1), so the fit
adds a Gaussian prior, an L2 penalty of strength `l2` on (w_e, w_k, b).

The softmax runs over the `shortlist` highest-scoring adapters only, not all of a store's
10,000: otherwise thousands of unrelated adapters, each with a tiny share, would together
dilute the probability of the right one as the store grows.

Features are arrays: F [n, m, 3] (n prompts, m choices: the base model first, then the
candidates; columns e, k, is_base), mask [n, m] (False = padding), y [n] the right column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_FEATURES = 3               # embedding score, keyword score, is-the-base-model


@dataclass(frozen=True)
class Calibration:
    """The fused score's weights, fitted by `fit` (defaults: RouterSettings)."""

    w_embed: float           # weight of the cosine score (an inverse temperature)
    w_keyword: float         # weight of the BM25 share
    bias_base: float         # the base model's score offset: higher abstains more

    @property
    def theta(self) -> np.ndarray:
        return np.array([self.w_embed, self.w_keyword, self.bias_base])


def features(e: np.ndarray, k: np.ndarray, e_base: np.ndarray) -> np.ndarray:
    """e, k [n, m-1] candidates' scores, e_base [n] -> F [n, m, 3], the base model first."""
    n, c = e.shape
    F = np.zeros((n, c + 1, N_FEATURES))
    F[:, 0, 0] = e_base
    F[:, 0, 2] = 1.0
    F[:, 1:, 0] = e
    F[:, 1:, 1] = k
    return F


def probabilities(F: np.ndarray, theta: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """[n, m] softmax of z = F @ theta over each row's choices (masked ones get 0)."""
    z = F @ theta                                                        # [n, m]
    if mask is not None:
        z = np.where(mask, z, -np.inf)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def neg_log_likelihood(F: np.ndarray, y: np.ndarray, theta: np.ndarray, l2: float,
                       mask: np.ndarray | None = None) -> float:
    """The penalized objective `fit` minimizes (mean over prompts)."""
    p = probabilities(F, theta, mask)
    return float(-np.log(p[np.arange(len(y)), y] + 1e-300).mean() + 0.5 * l2 * theta @ theta)


def fit(F: np.ndarray, y: np.ndarray, *, l2: float = 1e-3, mask: np.ndarray | None = None,
        iterations: int = 100) -> Calibration:
    """Maximum a-posteriori weights by Newton's method (the objective is convex).

    gradient = mean_i (E_p[F_i] - F_i,y_i) + l2 theta
    Hessian  = mean_i Cov_p[F_i]          + l2 I
    """
    n = len(y)
    theta = np.zeros(N_FEATURES)
    rows = np.arange(n)
    for _ in range(iterations):
        p = probabilities(F, theta, mask)                                # [n, m]
        mean_f = np.einsum("nm,nmf->nf", p, F)                           # [n, 3]
        grad = (mean_f - F[rows, y]).mean(axis=0) + l2 * theta           # [3]
        centred = F - mean_f[:, None, :]                                 # [n, m, 3]
        hess = np.einsum("nm,nmf,nmg->fg", p, centred, centred) / n + l2 * np.eye(N_FEATURES)
        step = np.linalg.solve(hess, grad)
        # Halve the step until the objective does not rise (Newton can overshoot far from 0).
        before = neg_log_likelihood(F, y, theta, l2, mask)
        scale = 1.0
        while neg_log_likelihood(F, y, theta - scale * step, l2, mask) > before and scale > 1e-6:
            scale /= 2
        theta = theta - scale * step
        if np.abs(scale * step).max() < 1e-9:
            break
    return Calibration(*map(float, theta))
