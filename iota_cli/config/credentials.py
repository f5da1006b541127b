"""The orchestrator token: where it comes from, and the OS keyring that stores it.

First found wins: --token, $IOTA_TOKEN, the systemd credential $CREDENTIALS_DIRECTORY/iota-token, then
the keyring (service "iota-cli", account = the orchestrator URL, then "default"). The token is never
a setting, never logged and never printed; fingerprint() is the only form of it that may be shown.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SERVICE = "iota-cli"
DEFAULT_ACCOUNT = "default"
CREDENTIAL_NAME = "iota-token"  # LoadCredential=iota-token:/etc/iota/token in the systemd unit
WAYS = (
    "pass --token TOKEN, set IOTA_TOKEN, give the service a systemd credential "
    f"(LoadCredential={CREDENTIAL_NAME}:/path/to/token), or run `iota login` on a host with an OS keyring"
)


class CredentialsError(RuntimeError):
    """No token could be found or stored; the message says every way to provide one."""


@dataclass(frozen=True)
class TokenSource:
    token: str
    source: str  # "--token", "IOTA_TOKEN", "systemd credential", "keyring"

    def __repr__(self) -> str:  # a stray print or log of this object must not leak the token
        return f"TokenSource(token={fingerprint(self.token)}..., source={self.source!r})"


def fingerprint(token: str) -> str:
    """A short, safe-to-show identifier: the first 8 hex digits of the token's sha256."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def account_for(orchestrator: str | None) -> str:
    return orchestrator.strip().rstrip("/") if orchestrator and orchestrator.strip() else DEFAULT_ACCOUNT


def _orchestrator(env: Mapping[str, str]) -> str:
    from iota_cli.config.settings import SettingsError, load

    try:
        return load(env).orchestrator
    except SettingsError:
        return ""


def _keyring():
    """The keyring module, or a CredentialsError saying why it cannot be used."""
    try:
        import keyring
    except Exception as e:  # noqa: BLE001 - a missing or broken install is "no keyring", not a crash
        raise CredentialsError(f"the keyring package cannot be imported ({e})") from None
    return keyring


def _keyring_get(accounts: list[str]) -> tuple[str | None, str | None]:
    """(token, None) from the first account that has one, or (None, why the keyring failed)."""
    try:
        kr = _keyring()
        for account in accounts:
            if token := (kr.get_password(SERVICE, account) or "").strip():
                return token, None
        return None, None
    except Exception as e:  # noqa: BLE001 - NoKeyringError, D-Bus failures, locked keychains, ...
        return None, _why(e)


def _why(e: BaseException) -> str:
    if type(e).__name__ == "NoKeyringError":  # keyring's fail backend: its message is a paragraph
        return "no keyring backend is installed or running"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def resolve_token(
    flag: str | None, env: Mapping[str, str] = os.environ, orchestrator: str | None = None
) -> TokenSource:
    """The token and where it came from, in the documented order; CredentialsError when none is found.

    orchestrator picks the keyring account; None means the configured one (settings).
    """
    if flag is not None:
        if not flag.strip():
            raise CredentialsError("--token was given an empty value")
        return TokenSource(flag.strip(), "--token")
    if token := env.get("IOTA_TOKEN", "").strip():
        return TokenSource(token, "IOTA_TOKEN")
    if creds := env.get("CREDENTIALS_DIRECTORY"):
        path = Path(creds) / CREDENTIAL_NAME
        try:
            if token := path.read_text().strip():
                return TokenSource(token, "systemd credential")
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as e:
            raise CredentialsError(f"cannot read the systemd credential {path}: {e}") from None
    url = _orchestrator(env) if orchestrator is None else orchestrator
    accounts = list(dict.fromkeys([account_for(url), DEFAULT_ACCOUNT]))
    stored, why = _keyring_get(accounts)
    if stored:
        return TokenSource(stored, "keyring")
    keyring_note = f" (the OS keyring is unavailable here: {why})" if why else ""
    raise CredentialsError(f"no token found{keyring_note}. To provide one: {WAYS}.")


def store_token(token: str, orchestrator: str | None = None) -> str:
    """Save the token in the OS keyring; return the keyring backend's name. CredentialsError if none."""
    token = token.strip()
    if not token:
        raise CredentialsError("the token is empty")
    try:
        kr = _keyring()
        kr.set_password(SERVICE, account_for(orchestrator), token)
        backend = kr.get_keyring()
        return getattr(backend, "name", type(backend).__name__)
    except CredentialsError as e:
        raise CredentialsError(f"cannot store the token: {e}. Instead, {_HEADLESS}") from None
    except Exception as e:  # noqa: BLE001
        raise CredentialsError(
            f"cannot store the token: no usable OS keyring ({_why(e)}). {_HEADLESS}"
        ) from None


_HEADLESS = (
    "On a host without a keyring, set IOTA_TOKEN or give the service a systemd credential "
    f"(LoadCredential={CREDENTIAL_NAME}:/path/to/token, file mode 0600)."
)


def delete_token(orchestrator: str | None = None) -> bool:
    """Remove the stored token; False when there was none. CredentialsError when no keyring works."""
    try:
        kr = _keyring()
        from keyring.errors import PasswordDeleteError

        try:
            kr.delete_password(SERVICE, account_for(orchestrator))
        except PasswordDeleteError:
            return False
        return True
    except CredentialsError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CredentialsError(f"cannot reach the OS keyring ({_why(e)})") from None
