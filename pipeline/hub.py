"""Whether a name can be loaded: a local directory, a hub name that can be fetched, or a mistake.

Every path that hands a user's name to `from_pretrained`, `datasets.load_dataset` or
`hf_hub_download` asks here first (`require_local_or_hub`, `require_hub`). Without it, a missing
local directory such as `runs/x/model` comes back as the hub's `Repo id must use alphanumeric
chars...`, and without network every hub name is retried for 20-30 s before failing.

Whether the hub can be reached is decided once per process (`offline_reason`): `HF_HUB_OFFLINE`
(or `TRANSFORMERS_OFFLINE`) set means no; else one TCP connection to the hub's host (or the
HTTPS proxy) with a short timeout. When it fails, the process is switched to offline mode, so that
names already in the local hub cache still load at once from there.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import CepeError

# How long the one connection attempt may take: a reachable hub answers in well under a second.
PROBE_TIMEOUT_S = 3.0
TRUE_VALUES = ("1", "on", "yes", "true")
# A hub repository id: `name` or `namespace/name`, letters, digits, '-', '_', '.' (not leading).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def looks_like_hub_id(name: str) -> bool:
    """True when `name` can be a hub repository id (what `from_pretrained` would try online)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith(".")


def _env_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in TRUE_VALUES for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _probe_target() -> tuple[str, int]:
    """(host, port) the hub is reached through: the HTTPS proxy when one is set, else the endpoint."""
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(key):
            url = urlparse(os.environ[key] if "://" in os.environ[key] else "http://" + os.environ[key])
            if url.hostname:
                return url.hostname, url.port or (443 if url.scheme == "https" else 80)
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)


def probe_network() -> str | None:
    """None when one TCP connection to the hub (or its proxy) opens in time, else why not."""
    host, port = _probe_target()
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"no network: {host}:{port} cannot be reached ({exc.strerror or exc})"
    return None


_UNPROBED = object()
_probed: object | str | None = _UNPROBED  # the probe's answer, once asked (None: reachable)


def offline_reason() -> str | None:
    """Why the hub cannot be reached in this process (None: it can); probed at most once."""
    global _probed
    if isinstance(_probed, str):
        return _probed  # our own probe failed earlier (and set HF_HUB_OFFLINE itself)
    if _env_offline():
        return "HF_HUB_OFFLINE is set"
    if _probed is _UNPROBED:
        _probed = probe_network()
        if _probed is not None:
            go_offline()
    return _probed  # type: ignore[return-value]


def go_offline() -> None:
    """Offline mode for this process: the libraries read the local hub cache and never retry."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True


def is_cached(repo_id: str, repo_type: str = "model") -> bool:
    """True when the local hub cache holds a snapshot of `repo_id` (what offline mode can load)."""
    root = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    snapshots = Path(root).expanduser() / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _unreachable(option: str, reason: str) -> str:
    flag = "--" + option.replace("_", "-")
    hint = "unset HF_HUB_OFFLINE to use the hub" if reason.startswith("HF_HUB_OFFLINE") else \
        "connect to the network, or set HF_HUB_OFFLINE=1 to skip the hub at once"
    return f"the hub cannot be reached ({reason}); pass a local directory with {flag} DIR, or {hint}"


def require_local_or_hub(name: str, option: str, repo_type: str = "model", label: str | None = None) -> None:
    """Fail fast, with one line naming `option`, unless `name` can be loaded.

    An existing local path passes. A name that cannot be a hub id (`runs/x/model`, `./m`, `/abs`)
    is a missing directory. A hub id passes when the hub is reachable or the local cache has it.
    The message starts with `label` (default: `option`), e.g. "source 'hf:org/x'".

    Raises:
        CepeError: "OPTION: no such directory: NAME" (and why the hub cannot serve it instead).
    """
    text, where = str(name), label or option
    if Path(text).expanduser().exists():
        return
    if not looks_like_hub_id(text):
        raise CepeError(f"{where}: no such directory: {text}")
    reason = offline_reason()
    if reason is None or is_cached(text, repo_type):
        return
    raise CepeError(f"{where}: no such directory: {text}, and as a hub name {_unreachable(option, reason)}")


def require_hub(repo_id: str, option: str, repo_type: str = "model") -> None:
    """Fail fast unless the hub repository `repo_id` can be fetched (reachable hub, or cached).

    Raises:
        CepeError: naming `option`, the reason and what to pass instead.
    """
    reason = offline_reason()
    if reason is None or is_cached(repo_id, repo_type):
        return
    raise CepeError(f"{option}: {repo_id} is fetched from the hub, but {_unreachable(option, reason)}")
