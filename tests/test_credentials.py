"""Where the token comes from (the order), the keyring that stores it, and that it never leaks.

This machine has no OS keyring (keyring's fail backend, which is exercised for real); an in-memory
backend stands in for a desktop's Secret Service or Keychain.
"""

from __future__ import annotations

import json

import keyring
import keyring.backend
import keyring.backends.fail
import pytest
from keyring.errors import PasswordDeleteError
from typer.testing import CliRunner

from iota_cli.app import app
from iota_cli.config import credentials
from iota_cli.config.credentials import CredentialsError, fingerprint, resolve_token

TOKEN = "iota_tok_5ecret-Value-0123456789"


class MemoryKeyring(keyring.backend.KeyringBackend):
    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[tuple[str, str], str] = {}

    def get_password(self, service, username):
        return self.store.get((service, username))

    def set_password(self, service, username, password):
        self.store[(service, username)] = password

    def delete_password(self, service, username):
        if self.store.pop((service, username), None) is None:
            raise PasswordDeleteError("not found")


class BrokenKeyring(MemoryKeyring):
    """A Secret Service whose D-Bus daemon is gone: every call raises something unexpected."""

    def get_password(self, service, username):
        raise OSError("org.freedesktop.secrets: daemon is neither running nor activatable through D-Bus")

    set_password = get_password  # type: ignore[assignment]


@pytest.fixture
def use_keyring():
    """Install a keyring backend for the test, restore the real one after."""
    before = keyring.get_keyring()

    def install(backend):
        keyring.set_keyring(backend)
        return backend

    yield install
    keyring.set_keyring(before)


@pytest.fixture
def memory_keyring(use_keyring):
    return use_keyring(MemoryKeyring())


@pytest.fixture
def no_keyring(use_keyring):
    return use_keyring(keyring.backends.fail.Keyring())


def test_order_flag_env_systemd_keyring(tmp_path, memory_keyring):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "iota-token").write_text("from-systemd\n")
    memory_keyring.set_password("iota-cli", "default", "from-keyring")
    env = {"IOTA_TOKEN": "from-env", "CREDENTIALS_DIRECTORY": str(creds), "IOTA_HOME": str(tmp_path)}
    assert resolve_token("from-flag", env) == credentials.TokenSource("from-flag", "--token")
    assert resolve_token(None, env) == credentials.TokenSource("from-env", "IOTA_TOKEN")
    del env["IOTA_TOKEN"]
    assert resolve_token(None, env) == credentials.TokenSource("from-systemd", "systemd credential")
    (creds / "iota-token").unlink()
    assert resolve_token(None, env) == credentials.TokenSource("from-keyring", "keyring")
    memory_keyring.delete_password("iota-cli", "default")
    with pytest.raises(CredentialsError):
        resolve_token(None, env)


def test_empty_values_do_not_count(tmp_path, memory_keyring):
    memory_keyring.set_password("iota-cli", "default", "stored")
    assert resolve_token(None, {"IOTA_TOKEN": "  ", "IOTA_HOME": str(tmp_path)}).source == "keyring"
    with pytest.raises(CredentialsError, match="empty"):
        resolve_token("", {})


def test_keyring_account_is_the_orchestrator_then_default(tmp_path, memory_keyring):
    credentials.store_token("for-a", "https://a.example/")
    credentials.store_token("general", None)
    env = {"IOTA_HOME": str(tmp_path)}
    assert resolve_token(None, env, orchestrator="https://a.example").token == "for-a"
    assert resolve_token(None, env, orchestrator="https://b.example").token == "general"
    (tmp_path / "config.toml").write_text('orchestrator = "https://a.example"\n')
    assert resolve_token(None, env).token == "for-a"  # None: the configured orchestrator
    assert credentials.delete_token("https://a.example") is True
    assert credentials.delete_token("https://a.example") is False


@pytest.mark.parametrize(
    "backend", [keyring.backends.fail.Keyring, BrokenKeyring], ids=["no backend", "d-bus"]
)
def test_a_keyring_that_raises_gives_a_message_naming_every_way(use_keyring, backend):
    use_keyring(backend())
    with pytest.raises(CredentialsError) as e:
        resolve_token(None, {"IOTA_HOME": "/nonexistent"})
    msg = str(e.value)
    for way in ("--token", "IOTA_TOKEN", "LoadCredential=iota-token", "iota login", "keyring is unavailable"):
        assert way in msg
    with pytest.raises(CredentialsError, match="IOTA_TOKEN"):
        credentials.store_token(TOKEN)


def test_missing_keyring_package_is_not_a_crash(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "keyring", None)
    with pytest.raises(CredentialsError, match="cannot be imported"):
        resolve_token(None, {"IOTA_HOME": "/nonexistent"})


def test_unreadable_systemd_credential_is_a_clear_error(tmp_path):
    (tmp_path / "iota-token").mkdir()  # a directory where the file should be
    with pytest.raises(CredentialsError, match="systemd credential"):
        resolve_token(None, {"CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_token_source_repr_hides_the_token():
    s = credentials.TokenSource(TOKEN, "IOTA_TOKEN")
    assert TOKEN not in repr(s) and TOKEN not in str(s) and fingerprint(TOKEN) in repr(s)


# --- the commands ----------------------------------------------------------------------------------


def invoke(args, **kw):
    return CliRunner().invoke(app, args, prog_name="iota", **kw)


def test_login_whoami_logout_never_show_the_token(iota_home, memory_keyring):
    seen = []

    def run(args, **kw):
        r = invoke(args, **kw)
        seen.append(r.stdout + r.stderr)
        return r

    assert run(["config", "set", "orchestrator", "https://swarm.example"]).exit_code == 0
    r = run(["login"], input=TOKEN + "\n")
    assert r.exit_code == 0, r.stderr
    assert memory_keyring.store[("iota-cli", "https://swarm.example")] == TOKEN
    assert fingerprint(TOKEN) in r.stdout

    r = run(["whoami", "--json"])
    info = json.loads(r.stdout)
    assert r.exit_code == 0 and info["source"] == "keyring" and info["fingerprint"] == fingerprint(TOKEN)
    assert run(["whoami"], env={"IOTA_TOKEN": "other"}).stdout.startswith("Token from IOTA_TOKEN")
    run(["config", "show"])
    run(["doctor", "--json", "--orchestrator", ""])  # no network: this test is about leaks
    assert run(["logout"]).exit_code == 0 and not memory_keyring.store
    assert run(["whoami"]).exit_code == 78

    assert all(TOKEN not in out for out in seen)
    for path in iota_home.rglob("*"):
        if path.is_file():
            assert TOKEN not in path.read_text(errors="replace"), path


def test_login_with_token_flag(memory_keyring):
    r = invoke(["login", "--token", TOKEN, "--orchestrator", "https://o.example"])
    assert r.exit_code == 0 and TOKEN not in r.stdout + r.stderr
    assert memory_keyring.store == {("iota-cli", "https://o.example"): TOKEN}


def test_headless_host_gets_a_message_not_a_traceback(no_keyring):
    r = invoke(["login"], input=TOKEN + "\n")
    assert r.exit_code == 78 and "Traceback" not in r.stderr and "IOTA_TOKEN" in r.stderr
    assert TOKEN not in r.stdout + r.stderr
    r = invoke(["whoami"])
    assert r.exit_code == 78 and "iota-token" in r.stderr and "Traceback" not in r.stderr
    r = invoke(["whoami", "--json"])
    assert r.exit_code == 78 and json.loads(r.stdout)["authenticated"] is False
    assert invoke(["logout"]).exit_code == 78


def test_whoami_reads_the_systemd_credential(tmp_path, no_keyring):
    (tmp_path / "iota-token").write_text(TOKEN)
    r = invoke(["whoami", "--json"], env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert r.exit_code == 0 and json.loads(r.stdout)["source"] == "systemd credential"


def test_config_refuses_to_store_a_token(iota_home):
    r = invoke(["config", "set", "token", TOKEN])
    assert r.exit_code == 2 and "iota login" in r.stderr
    assert not (iota_home / "config.toml").exists()
