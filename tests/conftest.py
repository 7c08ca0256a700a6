"""Fixtures more than one test file uses."""

import socket
import subprocess
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


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a file system of its own (a 16 MiB tmpfs), and `fill(leave=0)`, which writes a filler
    file there until the disk is full but for `leave` bytes: a later write that needs more meets a real
    ENOSPC, from whichever library makes it.
    Mounting needs root (CI and this project's machines run as root); elsewhere the test is skipped."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here (needs root): {mounted.stderr.decode().strip()}")

    def fill(leave: int = 0) -> None:
        """Fill the disk, then give `leave` bytes back (tmpfs counts whole 4 KiB pages)."""
        with open(folder / "filler", "wb", buffering=0) as filler:  # unbuffered: closing it writes nothing more
            for size in (65536, 4096, 512, 1):  # the last blocks in smaller and smaller pieces
                try:
                    while True:
                        filler.write(b"\0" * size)
                except OSError:
                    pass
            filler.truncate(max(0, filler.tell() - leave))

    try:
        yield types.SimpleNamespace(path=folder, fill=fill)
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
