"""edgelora_np: multi-tenant LoRA serving on small CPU boards, in NumPy and Numba.

    import edgelora_np as el
    model = el.load_model()          # the embedded SmolLM2-135M-Instruct Q4_1
"""

import os as _os

# Numba's OpenMP workers sleep between parallel regions; on small VMs and boards waking them
# costs milliseconds. Spinning briefly first (about a millisecond) keeps a decode loop's
# back-to-back kernels fast while letting idle workers sleep. Must be set before libgomp loads.
_os.environ.setdefault("GOMP_SPINCOUNT", "1000000")

from edgelora_np.errors import EdgeLoraError  # noqa: E402

__all__ = ["EdgeLoraError", "Engine", "Generation", "Model", "load_model"]
__version__ = "0.1.0"


def __getattr__(name):
    """The API (and with it NumPy and Numba) is imported on first use, so `edgelora --help`
    and the error classes stay cheap to import."""
    if name in ("Engine", "Generation", "Model", "load_model"):
        from edgelora_np import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgelora_np' has no attribute {name!r}")
