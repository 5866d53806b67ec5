"""Whether the Hugging Face Hub, where OpenCLIP's named weights ('openai', ...) live, can be
reached, so that a machine without network loads them from its cache, or says it cannot, at
once: huggingface_hub otherwise retries each file 5 times over ~45 s, logging each try."""
from __future__ import annotations

import contextlib
import socket
import threading
import urllib.parse
import urllib.request
from typing import Iterator, Optional

import huggingface_hub
import huggingface_hub.constants

PROBE_TIMEOUT_S = 3.0  # name lookup and TCP connect together


def hub_unreachable(timeout_s: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """Why the Hub (or the HTTPS proxy that reaches it) cannot be connected to; None when it
    can. Only the TCP connection is tried, in a thread, since a name lookup has no timeout."""
    endpoint = urllib.parse.urlsplit(huggingface_hub.hf_hub_url("any/repo", "any-file"))  # where downloads go
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        endpoint = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80))
    outcome: list[Optional[str]] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{err.strerror or err}")

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout_s)
    where = f"{address[0]}:{address[1]}"
    if not outcome:
        return f"{where}: no answer in {timeout_s:g} s"
    return None if outcome[0] is None else f"{where}: {outcome[0]}"


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[Optional[str]]:
    """Within: huggingface_hub works offline (cached files only, no request) when the Hub is
    unreachable; yields why it is, or None."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        yield None
        return
    reason = hub_unreachable()
    huggingface_hub.constants.HF_HUB_OFFLINE = reason is not None
    try:
        yield reason
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = False
