"""Settings: defaults, then the TOML config file, then `IOTA_<NAME>` environment variables.

Every path comes from here. `IOTA_HOME` relocates everything (tests and `iota swarm` workers use it);
under systemd the unit's $STATE_DIRECTORY / $CACHE_DIRECTORY / $LOGS_DIRECTORY are honoured.
Secrets are never settings: the token lives in the keyring (see credentials.py).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict
from dataclasses import dataclass as plain_dataclass
from pathlib import Path
from typing import Any, cast

import tomli_w
from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass

from iota_cli.core import schema
from iota_cli.core.files import atomic_write

APP_NAME = "iota"


@dataclass(frozen=True, config=ConfigDict(extra="ignore"))
class Settings:
    """Each field's description is its help in `iota config show` and the README's table."""

    orchestrator: str = Field(default="", description="URL of the orchestrator to join")
    backend: str = Field(
        default="auto", description="compute backend (auto, torch-cuda, torch-mps, torch-cpu, mlx, mlx-cpu)"
    )
    run: str = Field(default="", description="run id to join (empty: the orchestrator's active run)")
    name: str = Field(default="", description="display name for this contributor (empty: host name)")
    allow_battery: bool = Field(default=False, description="keep training on battery power (true/false)")
    max_memory_gb: float = Field(
        default=0.0, ge=0, description="cap on the memory a stage may use, in GB (0: no cap)"
    )

    @field_validator("allow_battery", mode="before")
    @classmethod
    def _empty_is_false(cls, v: Any) -> Any:
        return False if isinstance(v, str) and not v.strip() else v


SETTING_HELP = {name: f.description or "" for name, f in cast(Any, Settings).__pydantic_fields__.items()}
SECRET_KEYS = {"token", "admin_token", "password"}


class SettingsError(ValueError):
    """A setting name or value that cannot be used."""


@plain_dataclass(frozen=True)
class Paths:
    config_file: Path
    data_dir: Path  # checkpoints, local state
    cache_dir: Path  # downloaded weight shards
    log_dir: Path

    def to_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def paths(env: Mapping[str, str] | None = None) -> Paths:
    """Where config, data, cache and logs live: IOTA_HOME, then systemd's dirs, then platformdirs."""
    env = os.environ if env is None else env
    if home := env.get("IOTA_HOME"):
        h = Path(home)
        return Paths(h / "config.toml", h / "data", h / "cache", h / "logs")
    from platformdirs import PlatformDirs

    d = PlatformDirs(APP_NAME, appauthor=False)
    config_dir = Path(env.get("IOTA_CONFIG_DIR") or d.user_config_dir)
    # On macOS config and data share a directory, so data goes in a subfolder.
    data = Path(env.get("STATE_DIRECTORY") or d.user_data_dir) / "state"
    cache = Path(env.get("CACHE_DIRECTORY") or d.user_cache_dir)
    logs = Path(env.get("LOGS_DIRECTORY") or d.user_log_dir)
    return Paths(config_dir / "config.toml", data, cache, logs)


def _coerce(key: str, raw: Any) -> Any:
    """One setting's value, checked against its field (SettingsError names the setting)."""
    try:
        return getattr(schema.parse(Settings, {key: raw}), key)
    except schema.SchemaError as e:
        raise SettingsError(f"{key}: {raw!r} is not valid ({str(e).split(': ', 1)[-1]})") from None


def check_key(key: str) -> str:
    key = key.strip().lower().replace("-", "_")
    if key in SECRET_KEYS:
        raise SettingsError(f"{key} is a secret and is never stored in the config file; use `iota login`")
    if key not in SETTING_HELP:
        raise SettingsError(f"unknown setting {key!r} (known: {', '.join(SETTING_HELP)})")
    return key


def check_value(key: str, value: Any) -> None:
    """Refuse a value that parses but cannot work, before it is stored (loading stays lenient, so a bad
    value already in the file can still be changed or unset)."""
    if key == "backend" and value != "auto":
        from iota_cli.core.backend import known_names

        names = known_names()
        if value not in names:
            raise SettingsError(f"backend: unknown backend {value!r} (known: auto, {', '.join(names)})")
    if key == "orchestrator" and value:
        from iota_cli.core.urls import UrlError, check

        try:
            check(value)
        except UrlError as e:
            raise SettingsError(f"orchestrator: {e}") from None


def read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path} is not valid TOML: {e}") from None


def sources(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where each setting's effective value comes from: default, file or env."""
    env = os.environ if env is None else env
    file = read_file(paths(env).config_file)
    out = {}
    for key in SETTING_HELP:
        out[key] = "env" if f"IOTA_{key.upper()}" in env else "file" if key in file else "default"
    return out


def load(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for key, raw in read_file(paths(env).config_file).items():
        if key in SETTING_HELP:
            values[key] = _coerce(key, raw)
    for key in SETTING_HELP:
        if (raw := env.get(f"IOTA_{key.upper()}")) is not None:
            values[key] = _coerce(key, raw)
    return Settings(**values)


def set_value(key: str, raw: str, env: Mapping[str, str] | None = None) -> Any:
    """Validate and store one setting in the config file; return the stored value."""
    key = check_key(key)
    value = _coerce(key, raw)
    check_value(key, value)
    path = paths(env).config_file
    data = read_file(path)
    data[key] = value
    atomic_write(path, render_toml(data).encode())
    return value


def unset_value(key: str, env: Mapping[str, str] | None = None) -> None:
    key = check_key(key)
    path = paths(env).config_file
    data = read_file(path)
    if data.pop(key, None) is not None:
        atomic_write(path, render_toml(data).encode())


def render_toml(data: Mapping[str, Any]) -> str:
    return tomli_w.dumps(dict(data))
