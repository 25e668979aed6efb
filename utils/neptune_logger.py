"""Optional Neptune logging that can never stop a run.

``neptune`` (the package formerly called neptune-client; install one, never both) is imported only
when ``logger.neptune.enabled=true``; without it the run stops before training with a message that
names the extra: ``pip install -e '.[neptune]'``.

The API token is read by Neptune itself from the NEPTUNE_API_TOKEN environment variable: it is never
taken from the config, passed around, printed or saved (messages from Neptune are scrubbed of it).
Mode ``auto`` logs to the server when a token and a project are set and the server answers within
``connect_timeout`` seconds, and offline otherwise (``neptune sync`` uploads offline runs later).
If Neptune fails at start or while logging, a warning is printed once and the run goes on without it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import warnings
from typing import Any, Callable, Mapping, Optional

TOKEN_VARIABLE = "NEPTUNE_API_TOKEN"
PROJECT_VARIABLE = "NEPTUNE_PROJECT"
INSTALL_HINT = "pip install -e '.[neptune]'"


class NeptuneMissingError(ImportError):
    """``logger.neptune.enabled=true`` but the ``neptune`` package is not installed."""


def import_neptune() -> Any:
    try:
        import neptune
    except ImportError as err:
        raise NeptuneMissingError(
            f"logger.neptune.enabled=true needs the optional package 'neptune': {INSTALL_HINT} "
            "(or pip install neptune; do not also install neptune-client). Or set "
            "logger.neptune.enabled=false."
        ) from err
    return neptune


def _scrub(text: str) -> str:
    token = os.environ.get(TOKEN_VARIABLE)
    return text.replace(token, "<NEPTUNE_API_TOKEN>") if token else text


def describe(err: BaseException) -> str:
    """One short line for an exception from Neptune: no colour codes, banners or token."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("---")]
    return _scrub(f"{type(err).__name__}: {' '.join(lines)}")[:240]


def _server_reachable(token: str, timeout: float) -> bool:
    """Whether the API address encoded in a Neptune token answers an HTTP request within ``timeout``."""
    import urllib.error
    import urllib.request

    try:
        padded = token + "=" * (-len(token) % 4)
        address = json.loads(base64.b64decode(padded)).get("api_address", "")
        url = address if "//" in address else f"https://{address}"
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True  # the server answered (with an error status): it is reachable
    except Exception:  # noqa: BLE001 - a malformed token, no network, a timeout: all mean "offline"
        return False


def choose_mode(mode: str, project: Optional[str], timeout: float) -> tuple[str, str]:
    """(Neptune connection mode, reason) for ``logger.neptune.mode``; never raises."""
    if mode in ("offline", "debug"):
        return mode, f"mode {mode}"
    token = os.environ.get(TOKEN_VARIABLE)
    if not token:
        return "offline", f"no {TOKEN_VARIABLE} in the environment"
    if not project:
        return "offline", f"no project (logger.neptune.project or {PROJECT_VARIABLE})"
    if not _server_reachable(token, timeout):
        return "offline", "the Neptune server cannot be reached"
    return ("async" if mode == "auto" else mode), "server reachable"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a/b": value}; tuples/lists/None become strings (Neptune field types)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class NeptuneLogger:
    """Thin, failure-proof wrapper over one Neptune run; every method is a no-op once disabled."""

    def __init__(self, run: Any, mode: str, warn: Callable[[str], None]):
        self.run, self.mode, self._warn = run, mode, warn

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - Neptune must never stop training
            self._warn(f"Neptune: {what} failed ({describe(err)}); "
                       "Neptune logging is off for the rest of this run")
            run, self.run = self.run, None
            try:
                run.stop()
            except Exception:  # noqa: BLE001
                pass

    def log_metrics(self, prefix: str, metrics: Mapping[str, float], step: int) -> None:
        def log() -> None:
            for name, value in metrics.items():
                self.run[f"{prefix}/{name}"].append(float(value), step=step)

        self._guard("logging", log)

    def set_values(self, prefix: str, values: Mapping[str, Any]) -> None:
        def assign() -> None:
            for name, value in flatten(values, prefix).items():
                self.run[name] = value

        self._guard("writing fields", assign)

    def upload(self, name: str, path: str) -> None:
        if os.path.exists(path):
            self._guard(f"uploading {os.path.basename(path)}", lambda: self.run[name].upload(path))

    def close(self) -> None:
        self._guard("closing the run", lambda: self.run.stop())
        self.run = None


def start_neptune(cfg: Any, run_name: str, config: Mapping[str, Any], warn: Callable[[str], None],
                  say: Callable[[str], None] = print) -> NeptuneLogger:
    """A Neptune run for ``logger.neptune`` settings ``cfg`` (disabled logger when not enabled).

    Raises ``NeptuneMissingError`` when enabled without the package; any other failure to start
    falls back to offline mode, then to no Neptune at all, with a warning.
    """
    if not cfg.enabled:
        return NeptuneLogger(None, "disabled", warn)
    neptune = import_neptune()
    project = cfg.project or os.environ.get(PROJECT_VARIABLE)
    mode, reason = choose_mode(cfg.mode, project, cfg.connect_timeout)
    tried = [mode] if mode == "offline" else [mode, "offline"]
    for attempt in tried:
        try:
            kwargs: dict[str, Any] = dict(mode=attempt, name=cfg.name or run_name, tags=list(cfg.tags))
            if project:  # offline runs keep it too, for `neptune sync`
                kwargs["project"] = project
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run = neptune.init_run(**kwargs)
        except Exception as err:  # noqa: BLE001
            warn(f"Neptune could not start in {attempt} mode ({describe(err)})")
            reason = f"{attempt} mode failed"
            continue
        logger = NeptuneLogger(run, attempt, warn)
        logger.set_values("config", config)
        if attempt == "offline":
            say(f"Neptune: logging offline ({reason}); upload later with `neptune sync`")
        return logger
    warn("Neptune is off for this run")
    return NeptuneLogger(None, "disabled", warn)
