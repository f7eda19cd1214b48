import os

import pytest

# Every process a test starts (and every server or client it builds in-process) speaks with this
# run secret, as the processes of one `relay train` do; tests of authentication pass their own.
os.environ.setdefault("RELAY_SECRET", "5e" * 32)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded tiny model (random init), built once per test session."""
    from launcher.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))
