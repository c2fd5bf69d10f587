import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def paperzoo_home(tmp_path_factory):
    """Every test session gets its own cache and results home, so tests never touch a user's."""
    home = tmp_path_factory.mktemp("paperzoo-home")
    old = os.environ.get("PAPERZOO_HOME")
    os.environ["PAPERZOO_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("PAPERZOO_HOME", None)
    else:
        os.environ["PAPERZOO_HOME"] = old


@pytest.fixture(scope="session")
def smoke_lm(paperzoo_home):
    from paperzoo.core.models import base_model

    return base_model("smoke")
