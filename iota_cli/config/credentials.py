"""The orchestrator token: where it comes from, and where it is kept (the OS keyring, else a 0600 file).

First found wins: --token, $IOTA_TOKEN, the systemd credential $CREDENTIALS_DIRECTORY/iota-token, the
keyring (service "iota-cli", account = the orchestrator URL, then "default"), then the token file
`<data dir>/tokens/<orchestrator>-<hash>.token`. The file is where a host without a keyring (a server,
a container) keeps the token `iota join` registered or `iota login` was given, so a restart is the same
contributor; it is created with mode 0600, and a file others may read is refused, as ssh refuses a key.
The token is never a setting, never logged and never printed; fingerprint() is the only form of it that
may be shown. Try it: IOTA_HOME=/tmp/h python -m iota_cli whoami
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SERVICE = "iota-cli"
DEFAULT_ACCOUNT = "default"
CREDENTIAL_NAME = "iota-token"  # LoadCredential=iota-token:/etc/iota/token in the systemd unit
WAYS = (
    "pass --token TOKEN, set IOTA_TOKEN, give the service a systemd credential "
    f"(LoadCredential={CREDENTIAL_NAME}:/path/to/token), or run `iota login`"
)
TOKEN_DIR = "tokens"  # under the data dir


class CredentialsError(RuntimeError):
    """No token could be found or stored; the message says every way to provide one."""


class NoToken(CredentialsError):
    """None of the sources has a token (as opposed to one that exists but cannot be used)."""


@dataclass(frozen=True)
class TokenSource:
    token: str
    source: str  # "--token", "IOTA_TOKEN", "systemd credential", "keyring", "token file"

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


def _no_keyring(e: BaseException) -> bool:
    return type(e).__name__ == "NoKeyringError"  # keyring's fail backend: there is no keyring at all


def _why(e: BaseException) -> str:
    if _no_keyring(e):  # its message is a paragraph
        return "no keyring backend is installed or running"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def resolve_token(
    flag: str | None, env: Mapping[str, str] = os.environ, orchestrator: str | None = None
) -> TokenSource:
    """The token and where it came from, in the documented order; CredentialsError when none is found.

    orchestrator picks the keyring account and the token file; None means the configured one (settings).
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
    for account in accounts:
        if kept := read_token_file(token_file(account, env)):
            return TokenSource(kept, "token file")
    keyring_note = f" (the OS keyring is unavailable here: {why})" if why else ""
    raise NoToken(f"no token found{keyring_note}. To provide one: {WAYS}.")


def store_token(token: str, orchestrator: str | None = None) -> str:
    """Save the token in the OS keyring; return the keyring backend's name. CredentialsError if none."""
    try:
        return _keyring_set(_nonempty(token), account_for(orchestrator))
    except CredentialsError as e:
        raise CredentialsError(f"cannot store the token: no usable OS keyring ({e}). {_HEADLESS}") from None


_HEADLESS = (
    "On a host without a keyring, set IOTA_TOKEN or give the service a systemd credential "
    f"(LoadCredential={CREDENTIAL_NAME}:/path/to/token, file mode 0600)."
)


@dataclass(frozen=True)
class Kept:
    """Where keep_token put the token: the OS keyring, or the token file and why not the keyring."""

    where: str  # "keyring" or "token file"
    detail: str  # the keyring backend's name, or the file's path
    why: str = ""  # why the keyring could not keep it

    def describe(self) -> str:
        if self.where == "keyring":
            return f"in the OS keyring ({self.detail})"
        return f"in {self.detail} (mode 0600; no usable OS keyring here: {self.why})"


def keep_token(token: str, orchestrator: str | None = None, env: Mapping[str, str] = os.environ) -> Kept:
    """Keep the token where resolve_token finds it again: the OS keyring, else the token file.

    CredentialsError only when neither can hold it (then the message says how to provide it instead).
    """
    token, account = _nonempty(token), account_for(orchestrator)
    try:
        return Kept("keyring", _keyring_set(token, account))
    except CredentialsError as e:
        why = str(e)
    path = token_file(account, env)
    try:
        write_token_file(path, token)
    except OSError as e:
        raise CredentialsError(
            f"cannot keep the token: no usable OS keyring ({why}), and {path} cannot be written "
            f"({e.strerror or e}). {_HEADLESS}"
        ) from None
    return Kept("token file", str(path), why)


def delete_token(orchestrator: str | None = None, env: Mapping[str, str] = os.environ) -> bool:
    """Remove the stored token from the keyring and the token file; False when neither had one.

    CredentialsError when a keyring that exists cannot be asked (and the file held nothing either);
    a host with no keyring at all simply has nothing stored there.
    """
    account = account_for(orchestrator)
    path = token_file(account, env)
    try:
        path.unlink()
        in_file = True
    except FileNotFoundError:
        in_file = False
    except OSError as e:
        raise CredentialsError(f"cannot remove the token file {path}: {e.strerror or e}") from None
    try:
        return _keyring_delete(account) or in_file
    except CredentialsError:
        if in_file:
            return True
        raise


# --- the token file --------------------------------------------------------------------------------------


def token_file(orchestrator: str | None, env: Mapping[str, str] = os.environ) -> Path:
    """Where the token for this orchestrator is kept on a host without a keyring (one file per URL)."""
    from iota_cli.config.settings import paths

    account = account_for(orchestrator)
    # Readable enough to tell the files apart, and a hash so two URLs never share one.
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", account.split("://", 1)[-1]).strip("_")[:48] or "default"
    digest = hashlib.sha256(account.encode()).hexdigest()[:12]
    return paths(env).data_dir / TOKEN_DIR / f"{slug}-{digest}.token"


def write_token_file(path: Path, token: str) -> None:
    """Write the token to path, never readable by others, not even for an instant (OSError if not)."""
    from iota_cli.core.files import atomic_writer

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # atomic_writer's temp file is created 0600 (mkstemp) and renamed over path when whole.
    with atomic_writer(path, mode=0o600) as f:
        f.write(token.encode() + b"\n")


def read_token_file(path: Path) -> str | None:
    """The token in path, None when there is no such file; CredentialsError when it must not be used."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CredentialsError(f"cannot read the token file {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)  # of the file opened, not of a swapped one
        if os.name == "posix" and mode & 0o077:
            raise CredentialsError(
                f"the token file {path} has mode {mode:04o}, so other users can read or change it; "
                f"refusing to use it. Run `chmod 600 {path}` (and get a new token if others could read it)"
            )
        try:
            return f.read().decode().strip() or None
        except (OSError, UnicodeDecodeError) as e:
            raise CredentialsError(f"cannot read the token file {path}: {e}") from None


# --- the keyring -----------------------------------------------------------------------------------------


def _nonempty(token: str) -> str:
    if not token.strip():
        raise CredentialsError("the token is empty")
    return token.strip()


def _keyring_set(token: str, account: str) -> str:
    """Store in the keyring; the backend's name, or CredentialsError saying in a few words why not."""
    kr = _keyring()
    try:
        kr.set_password(SERVICE, account, token)
        backend = kr.get_keyring()
    except Exception as e:  # noqa: BLE001
        raise CredentialsError(_why(e)) from None
    return getattr(backend, "name", type(backend).__name__)


def _keyring_delete(account: str) -> bool:
    """Remove from the keyring; False when it held nothing, or when there is no keyring at all."""
    try:
        kr = _keyring()
    except CredentialsError:
        return False  # the keyring package cannot even be imported: nothing can be stored in it
    from keyring.errors import PasswordDeleteError

    try:
        kr.delete_password(SERVICE, account)
    except PasswordDeleteError:
        return False
    except Exception as e:  # noqa: BLE001
        if _no_keyring(e):
            return False
        raise CredentialsError(f"cannot reach the OS keyring ({_why(e)})") from None
    return True
