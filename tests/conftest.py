"""Fixtures more than one test file uses."""

import socket
import types

import datasets
import huggingface_hub
import pytest


@pytest.fixture
def hub(monkeypatch):
    """The hub state of a fresh process, restored after the test, with the hub's TCP port answering;
    `hub.down()` makes it unreachable, as on a machine without a network."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    probes = []

    def answers(address, timeout):
        probes.append((address, timeout))
        return socket.socket()  # a socket that is closed at once, as after a real probe

    def unreachable(address, timeout):
        probes.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", answers)
    return types.SimpleNamespace(made=probes, down=lambda: monkeypatch.setattr(socket, "create_connection", unreachable))


@pytest.fixture(autouse=True)
def own_eval_cache(tmp_path, monkeypatch):
    """Each test its own cache of base evaluations: a test never reuses another's (nor the user's)."""
    monkeypatch.setenv("BITFIT_EVAL_CACHE", str(tmp_path / "base-evals"))
