"""Whether the Hugging Face hub answers: asked once, quickly, because the hub clients retry for a minute
before failing on a machine without internet."""

import functools
import os
import socket
from urllib.parse import urlparse


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return False
    return answers(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.cache
def answers(endpoint: str, timeout: float = 3.0) -> bool:
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False
