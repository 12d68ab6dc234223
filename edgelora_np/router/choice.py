"""Which adapter to serve, given the calibrated candidates: the choice policies.

Both policies abstain (serve the base model) when the most probable adapter's probability is
below tau or below the base model's own probability ("no adapter fits").

    best    otherwise the most probable adapter.
    cache   EdgeLoRA's rule, made measurable: among the top-k candidates whose probability is
            at least tau, above the base model's and within delta of the best's, prefer one
            already resident in the adapter pool (the most probable such); otherwise the best.
            It trades a little accuracy for pool hits: tools/eval_router.py measures both on
            a Zipf trace (docs/router.md).

A policy is a small class with one method, chosen by name from CHOICES.
"""

from __future__ import annotations

from collections.abc import Set


class BestChoice:
    name = "best"

    def choose(self, candidates: list[tuple[str, float]], base: float, resident: Set[str], *,
               tau: float, delta: float, top_k: int) -> tuple[str | None, str]:
        """candidates: (adapter, probability), most probable first; base: the base model's
        probability -> (adapter or None for the base model, reason)."""
        if not candidates or candidates[0][1] < max(tau, base):
            return None, "abstain"
        return candidates[0][0], "best"


class CacheAwareChoice:
    name = "cache"

    def choose(self, candidates: list[tuple[str, float]], base: float, resident: Set[str], *,
               tau: float, delta: float, top_k: int) -> tuple[str | None, str]:
        if not candidates or candidates[0][1] < max(tau, base):
            return None, "abstain"
        best_name, best_p = candidates[0]
        if best_name in resident:
            return best_name, "best"
        for name, p in candidates[1:top_k]:
            if p >= max(tau, base) and p >= best_p - delta and name in resident:
                return name, "cache"
        return best_name, "best"


CHOICES = {c.name: c for c in (BestChoice(), CacheAwareChoice())}
