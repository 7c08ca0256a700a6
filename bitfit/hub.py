"""Can the Hugging Face hub be reached? Asked in seconds, before a load would wait on it.

Without a network the hub libraries retry for most of a minute before they fail. `unreachable` asks
first, with one TCP connection; when none opens, it switches those libraries to offline mode, so that
what is already in the local cache still loads, at once, and anything else fails at once.
"""

import os
import socket
import sys
from urllib.parse import urlsplit

TIMEOUT_S = 3.0
_TRUE = ("1", "ON", "YES", "TRUE")  # the values huggingface_hub reads as true


def unreachable(what: str) -> str:
    """'' when the hub may be asked for `what`; else the one line to raise if loading it from the local
    cache then fails: the hub cannot be reached, so pass a local file or folder instead.

    Unless HF_HUB_OFFLINE is set, this opens (and closes) a TCP connection to the hub (huggingface.co,
    or $HF_ENDPOINT) within TIMEOUT_S. When none opens it sets HF_HUB_OFFLINE=1 for the rest of the run.
    """
    instead = "pass a local file or folder instead"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        return f"HF_HUB_OFFLINE is set and {what} is not in the local hub cache; {instead}"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return ""  # the hub is reached through the proxy, not directly: a direct connection proves nothing
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    address = (endpoint.hostname, endpoint.port or (80 if endpoint.scheme == "http" else 443))
    try:
        socket.create_connection(address, timeout=TIMEOUT_S).close()
        return ""
    except OSError:
        pass
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by the hub libraries imported from here on...
    for module in ("huggingface_hub.constants", "datasets.config"):  # ...and already read by those imported
        if module in sys.modules:
            sys.modules[module].HF_HUB_OFFLINE = True
    return f"the hub ({address[0]}) cannot be reached and {what} is not in the local hub cache; {instead}"
