"""Adaptive adapter selection: which adapter serves a prompt that names none (docs/router.md).

    from edgelora_np.router import Router, RouterSettings
    router = Router.from_store(store, model, settings=RouterSettings())
    route = router.route("What is 17 March 2001 in ISO format?", resident={"dates"})

Modules, in the order a route runs through them: embed.py (the base model's hidden states as
prompt embeddings), keywords.py (BM25 over the cards), calibrate.py (fused scores ->
probabilities, "no adapter" included), choice.py (best, or cache-aware), index.py (the
embeddings of the cards, kept in the adapter store), router.py (Router, Route, RouterSettings).
"""

from edgelora_np.router.router import Route, Router, RouterSettings, settings_from

__all__ = ["Route", "Router", "RouterSettings", "settings_from"]
