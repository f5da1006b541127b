"""Where the token comes from (the order), the keyring or 0600 file that keeps it, and that it never leaks.

This machine has no OS keyring (keyring's fail backend, which is exercised for real); an in-memory
backend stands in for a desktop's Secret Service or Keychain.
"""

from __future__ import annotations

import json
import os
import stat

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


def test_headless_host_keeps_the_token_in_a_file_only_its_user_can_read(iota_home, no_keyring):
    r = invoke(["login", "--orchestrator", "https://o.example"], input=TOKEN + "\n")
    assert r.exit_code == 0 and "Traceback" not in r.stderr, r.stderr
    path = credentials.token_file("https://o.example", {"IOTA_HOME": str(iota_home)})
    assert str(path) in r.stdout and "0600" in r.stdout and "no keyring backend" in r.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().strip() == TOKEN
    r = invoke(["whoami", "--json"], env={"IOTA_ORCHESTRATOR": "https://o.example"})
    assert r.exit_code == 0 and json.loads(r.stdout)["source"] == "token file", r.stderr
    assert TOKEN not in r.stdout + r.stderr
    r = invoke(["logout", "--orchestrator", "https://o.example"])
    assert r.exit_code == 0 and "Removed" in r.stdout and not path.exists()
    r = invoke(["logout", "--orchestrator", "https://o.example"])
    assert r.exit_code == 0 and "No token was stored" in r.stdout
    r = invoke(["whoami"], env={"IOTA_ORCHESTRATOR": "https://o.example"})
    assert r.exit_code == 78 and "iota-token" in r.stderr and "Traceback" not in r.stderr
    r = invoke(["whoami", "--json"])
    assert r.exit_code == 78 and json.loads(r.stdout)["authenticated"] is False


def test_the_token_file_is_0600_from_the_moment_it_exists(tmp_path, monkeypatch):
    import iota_cli.core.files as files

    seen = []
    real = files.commit

    def spy(part, dest, **kw):  # the temp file, whole, just before it is renamed into place
        seen.append(stat.S_IMODE(os.stat(part).st_mode))
        real(part, dest, **kw)

    monkeypatch.setattr(files, "commit", spy)
    old = os.umask(0)  # the most permissive umask: the mode must not depend on it
    try:
        path = tmp_path / "tokens" / "t.token"
        credentials.write_token_file(path, TOKEN)
    finally:
        os.umask(old)
    assert seen == [0o600] and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["t.token"], "no temp file left behind"


def test_order_keyring_then_token_file(tmp_path, memory_keyring):
    env = {"IOTA_HOME": str(tmp_path)}
    credentials.write_token_file(credentials.token_file("https://a.example", env), "from-file")
    assert resolve_token(None, env, orchestrator="https://a.example/") == credentials.TokenSource(
        "from-file", "token file"
    )
    memory_keyring.set_password("iota-cli", "https://a.example", "from-keyring")
    assert resolve_token(None, env, orchestrator="https://a.example").source == "keyring"
    assert resolve_token(None, {**env, "IOTA_TOKEN": "e"}, orchestrator="https://a.example").token == "e"
    with pytest.raises(credentials.NoToken):
        resolve_token(None, env, orchestrator="https://b.example")  # one file per orchestrator


def test_keep_token_falls_back_to_the_file_and_says_why(tmp_path, no_keyring):
    env = {"IOTA_HOME": str(tmp_path)}
    kept = credentials.keep_token(TOKEN, "http://o.example:8700", env)
    assert kept.where == "token file" and "no keyring backend" in kept.why and TOKEN not in kept.describe()
    assert resolve_token(None, env, orchestrator="http://o.example:8700").token == TOKEN
    assert credentials.delete_token("http://o.example:8700", env) is True
    assert credentials.delete_token("http://o.example:8700", env) is False


def test_keep_token_says_how_when_no_file_can_be_written_either(tmp_path, no_keyring):
    (tmp_path / "data").write_text("a file where the data dir should be")
    with pytest.raises(CredentialsError, match="IOTA_TOKEN") as e:
        credentials.keep_token(TOKEN, "http://o.example", {"IOTA_HOME": str(tmp_path)})
    assert TOKEN not in str(e.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_token_file_others_can_read_is_refused_with_a_chmod_hint(iota_home, no_keyring, mode):
    env = {"IOTA_HOME": str(iota_home)}
    path = credentials.token_file("https://o.example", env)
    credentials.write_token_file(path, TOKEN)
    path.chmod(mode)
    with pytest.raises(CredentialsError, match=f"mode 0{mode:o}") as e:
        resolve_token(None, env, orchestrator="https://o.example")
    assert not isinstance(e.value, credentials.NoToken) and f"chmod 600 {path}" in str(e.value)
    r = invoke(["whoami"], env={"IOTA_ORCHESTRATOR": "https://o.example"})
    assert r.exit_code == 78 and "chmod 600" in r.stderr and "Traceback" not in r.stderr
    assert TOKEN not in r.stdout + r.stderr


def test_whoami_reads_the_systemd_credential(tmp_path, no_keyring):
    (tmp_path / "iota-token").write_text(TOKEN)
    r = invoke(["whoami", "--json"], env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert r.exit_code == 0 and json.loads(r.stdout)["source"] == "systemd credential"


def test_config_refuses_to_store_a_token(iota_home):
    r = invoke(["config", "set", "token", TOKEN])
    assert r.exit_code == 2 and "iota login" in r.stderr
    assert not (iota_home / "config.toml").exists()
