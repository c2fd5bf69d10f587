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


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests run tiny models, whose small operations gain nothing from a second thread and, on a busy
    machine, wait for it (measured: 50x slower decoding steps with two threads under load)."""
    from paperzoo.core.training import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="session")
def smoke_lm(paperzoo_home):
    from paperzoo.core.models import base_model

    return base_model("smoke")
