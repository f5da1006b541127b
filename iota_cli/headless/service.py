"""systemd unit for `iota join`: render it (a pure function of UnitOptions), install, uninstall, inspect.

Every systemctl / journalctl / systemd-creds call goes through an injectable `Runner`, so tests record the
calls instead of needing a running systemd. `iota service install --print` shows what would be written.
The token reaches the service as a systemd credential ($CREDENTIALS_DIRECTORY/iota-token), never as text
in the unit.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from iota_cli.config import settings
from iota_cli.core.files import atomic_write
from iota_cli.headless.host import BASELINE_SYSTEMD, Runner, Scope, iota_executable, run_command
from iota_cli.output import EXIT_CONFIG

UNIT_NAME = "iota.service"
CREDENTIAL_ID = "iota-token"


class ServiceError(RuntimeError):
    """A service operation that could not be done; the message says what to do."""


class EncryptError(ServiceError):
    """systemd-creds could not encrypt the token (no host key or TPM2 access)."""


@dataclass(frozen=True)
class Credential:
    path: str  # absolute path of the file systemd loads at start-up
    encrypted: bool = False  # written by `systemd-creds encrypt` (host key or TPM2)


@dataclass(frozen=True)
class UnitOptions:
    scope: Scope
    exec_start: tuple[str, ...]  # absolute executable first
    credential: Credential | None = None
    run_as: str | None = None  # system units: User=
    environment: tuple[tuple[str, str], ...] = ()
    writable_paths: tuple[str, ...] = ()  # user units: the platformdirs data/cache/log dirs
    sandbox: bool = True  # mount-namespace hardening (user units need unprivileged user namespaces)
    systemd_version: int = BASELINE_SYSTEMD
    watchdog_s: int = 300  # longer than any blocking call in the loop (HTTP retries, one slow step)
    start_timeout_s: int = 600  # weights download before READY=1; the loop may extend it
    stop_timeout_s: int = 180  # finish the item in flight and checkpoint
    restart_s: int = 30


@dataclass(frozen=True)
class Layout:
    """Where install puts things (tests point it at a temp dir)."""

    unit_dir: Path
    credential_dir: Path


def default_layout(scope: Scope, env: Mapping[str, str] | None = None) -> Layout:
    env = os.environ if env is None else env
    if scope == "system":
        # /etc/systemd/system is the admin's place (/lib/systemd/system belongs to packages).
        return Layout(Path("/etc/systemd/system"), Path("/etc/credstore"))
    config_home = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    creds = settings.paths(env).config_file.parent / "credentials"
    return Layout(config_home / "systemd" / "user", creds)


# -- rendering -------------------------------------------------------------------------------------------


def _spec(text: str) -> str:
    """Escape systemd specifiers: a literal % is %%."""
    return text.replace("%", "%%")


def _quote(word: str, command: bool = True) -> str:
    """One word for ExecStart= (command: $ is variable syntax there), Environment= or a path list."""
    word = _spec(word)
    if command:
        word = word.replace("$", "$$")
    if word and not re.search(r'[\s"\'\\;]', word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def join_command(executable: Sequence[str], orchestrator: str, backend: str) -> tuple[str, ...]:
    return (*executable, "join", "--orchestrator", orchestrator, "--backend", backend)


def render_unit(o: UnitOptions) -> str:
    """The unit file text for these options; passes `systemd-analyze verify` on systemd 252 and later."""
    if not os.path.isabs(o.exec_start[0]):
        raise ServiceError(f"ExecStart needs an absolute path, got {o.exec_start[0]!r}")
    user = o.scope == "user"
    unit = [
        "[Unit]",
        "Description=iota: contribute compute to an LLM pretraining swarm",
    ]
    if not user:  # the user manager has no network-online.target
        unit += ["After=network-online.target", "Wants=network-online.target"]
    unit += ["StartLimitIntervalSec=10min", "StartLimitBurst=5"]

    svc = [
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=" + " ".join(_quote(w) for w in o.exec_start),
        "Restart=on-failure",
        f"RestartSec={o.restart_s}s",
    ]
    if o.systemd_version >= 254:  # exponential backoff; 252 warns "Unknown key" on these
        svc += ["RestartSteps=5", "RestartMaxDelaySec=10min"]
    svc += [
        f"RestartPreventExitStatus={EXIT_CONFIG}",
        f"WatchdogSec={o.watchdog_s}s",
        f"TimeoutStartSec={o.start_timeout_s}s",
        f"TimeoutStopSec={o.stop_timeout_s}s",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        "SyslogIdentifier=iota",
        "Environment=PYTHONUNBUFFERED=1",
    ]
    svc += [f"Environment={_quote(f'{k}={v}', command=False)}" for k, v in o.environment]
    if o.run_as and not user:
        svc.append(f"User={_spec(o.run_as)}")
    if o.credential:
        key = "LoadCredentialEncrypted" if o.credential.encrypted else "LoadCredential"
        svc.append(f"{key}={CREDENTIAL_ID}:{_spec(o.credential.path)}")
    if not user:
        svc += ["StateDirectory=iota", "CacheDirectory=iota", "LogsDirectory=iota"]
        svc.append("ConfigurationDirectory=iota")
        svc.append("Environment=IOTA_CONFIG_DIR=/etc/iota")
    # No PrivateDevices= (it hides /dev/nvidia*) and no MemoryDenyWriteExecute= (it breaks JIT compilers).
    svc.append("NoNewPrivileges=yes")
    if o.sandbox:
        svc += [
            "ProtectSystem=strict",
            "ProtectHome=read-only",  # the venv may live in a home directory
            "PrivateTmp=yes",
            "ProtectKernelModules=yes",
            "ProtectControlGroups=yes",
            "RestrictSUIDSGID=yes",
            "LockPersonality=yes",
        ]
        if user and o.writable_paths:
            # "-": a missing directory is skipped instead of failing the start.
            svc.append("ReadWritePaths=" + " ".join(_quote("-" + p, command=False) for p in o.writable_paths))

    install = ["[Install]", "WantedBy=default.target" if user else "WantedBy=multi-user.target"]
    return "\n".join(unit + [""] + svc + [""] + install) + "\n"


def service_environment(scope: Scope, env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """IOTA_* path overrides the service must share with this shell so both use the same directories."""
    # Triton's JIT cache defaults to ~/.triton, read-only under ProtectHome=: keep it in our cache dir.
    if scope == "system":
        return (("TRITON_CACHE_DIR", "/var/cache/iota/triton"),)  # CacheDirectory=iota
    out = [(k, env[k]) for k in ("IOTA_HOME", "IOTA_CONFIG_DIR") if env.get(k)]
    return (*out, ("TRITON_CACHE_DIR", str(settings.paths(env).cache_dir / "triton")))


def writable_paths(scope: Scope, env: Mapping[str, str]) -> tuple[str, ...]:
    if scope == "system":
        return ()  # StateDirectory= and friends
    p = settings.paths(env)
    dirs = [p.data_dir, p.cache_dir, p.log_dir]
    if env.get("IOTA_HOME"):
        dirs = [Path(env["IOTA_HOME"])]
    return tuple(str(d) for d in dirs)


def unit_options(
    scope: Scope,
    orchestrator: str,
    backend: str,
    *,
    layout: Layout,
    executable: Sequence[str] | None = None,
    with_credential: bool = True,
    encrypt: bool = False,
    run_as: str | None = None,
    sandbox: bool = True,
    version: int = BASELINE_SYSTEMD,
    env: Mapping[str, str] | None = None,
) -> UnitOptions:
    """Everything install and --print need, decided once from the flags and facts about the host."""
    env = os.environ if env is None else env
    cred = None
    if with_credential:
        name = CREDENTIAL_ID + (".cred" if encrypt else "")
        cred_dir = layout.credential_dir
        if encrypt:
            cred_dir = cred_dir.with_name(cred_dir.name + ".encrypted")
        cred = Credential(str(cred_dir / name), encrypted=encrypt)
    return UnitOptions(
        scope=scope,
        exec_start=join_command(executable or iota_executable(), orchestrator, backend),
        credential=cred,
        run_as=run_as if scope == "system" else None,
        environment=service_environment(scope, env),
        writable_paths=writable_paths(scope, env),
        sandbox=sandbox,
        systemd_version=version,
    )


# -- operations --------------------------------------------------------------------------------------------


def systemctl(scope: Scope) -> list[str]:
    return ["systemctl", "--user"] if scope == "user" else ["systemctl"]


@dataclass
class InstallResult:
    unit_path: Path
    unit_changed: bool
    credential_changed: bool
    commands: list[list[str]] = field(default_factory=list)


def _check(runner: Runner, argv: list[str], log: list[list[str]], input: str | None = None) -> str:
    log.append(argv)
    out = runner(argv, input=input)
    if out.returncode != 0:
        detail = (out.stderr or out.stdout or "").strip().splitlines()
        raise ServiceError(f"`{' '.join(argv)}` failed: {detail[-1] if detail else f'exit {out.returncode}'}")
    return out.stdout or ""


def _write_credential(cred: Credential, token: str, runner: Runner, log: list[list[str]]) -> bool:
    """Store the token where the unit loads it from; False when it was already there."""
    path = Path(cred.path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if cred.encrypted:
        if path.exists():
            log.append(["systemd-creds", "decrypt", f"--name={CREDENTIAL_ID}", str(path), "-"])
            old = runner(log[-1])
            if old.returncode == 0 and old.stdout == token:
                return False
        argv = ["systemd-creds", "encrypt", f"--name={CREDENTIAL_ID}", "-", str(path)]
        try:
            _check(runner, argv, log, input=token)  # token on stdin: never in argv (ps) or the unit
        except ServiceError as e:
            raise EncryptError(str(e)) from None
        os.chmod(path, 0o600)
        return True
    if path.exists() and path.read_text() == token:
        return False
    atomic_write(path, token.encode(), mode=0o600)
    return True


def install(
    opts: UnitOptions, layout: Layout, token: str | None, runner: Runner = run_command, start: bool = True
) -> InstallResult:
    """Write the credential and unit, reload systemd, enable (and start) the unit. Safe to repeat."""
    log: list[list[str]] = []
    cred_changed = False
    if opts.credential:
        if not token:
            raise ServiceError("no token to give the service: run `iota login` or set IOTA_TOKEN")
        cred_changed = _write_credential(opts.credential, token, runner, log)
    for d in opts.writable_paths:  # ReadWritePaths= skips a missing dir, which then stays read-only
        Path(d).mkdir(parents=True, exist_ok=True)
    unit_path = layout.unit_dir / UNIT_NAME
    text = render_unit(opts)
    existed = unit_path.exists()
    unit_changed = not existed or unit_path.read_text() != text
    if unit_changed:
        atomic_write(unit_path, text.encode(), mode=0o644)
    ctl = systemctl(opts.scope)
    if unit_changed:
        _check(runner, [*ctl, "daemon-reload"], log)
    if existed and (unit_changed or cred_changed):
        _check(runner, [*ctl, "try-restart", UNIT_NAME], log)  # a running service picks up the change
    _check(runner, [*ctl, "enable", *(["--now"] if start else []), UNIT_NAME], log)
    return InstallResult(unit_path, unit_changed, cred_changed, log)


def uninstall(scope: Scope, layout: Layout, runner: Runner = run_command) -> list[Path]:
    """Stop, disable and remove the unit and its credential; return what was removed. Keeps data."""
    log: list[list[str]] = []
    unit_path = layout.unit_dir / UNIT_NAME
    removed = []
    ctl = systemctl(scope)
    if unit_path.exists():
        _check(runner, [*ctl, "disable", "--now", UNIT_NAME], log)
        unit_path.unlink()
        removed.append(unit_path)
        _check(runner, [*ctl, "daemon-reload"], log)
    enc = layout.credential_dir.with_name(layout.credential_dir.name + ".encrypted")
    for cred in (layout.credential_dir / CREDENTIAL_ID, enc / f"{CREDENTIAL_ID}.cred"):
        if cred.exists():
            cred.unlink()
            removed.append(cred)
    return removed


# StatusText is the worker's sd_notify STATUS=.
STATUS_PROPERTIES: tuple[str, ...] = ("LoadState", "ActiveState", "SubState", "UnitFileState", "StatusText")
STATUS_PROPERTIES += ("MainPID", "NRestarts", "Result", "ActiveEnterTimestamp")


def status(scope: Scope, runner: Runner = run_command) -> dict[str, str]:
    """The unit's state from `systemctl show` (StatusText is the worker's sd_notify STATUS=)."""
    argv = [*systemctl(scope), "show", UNIT_NAME, "--property=" + ",".join(STATUS_PROPERTIES)]
    out = _check(runner, argv, [])
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return {k: props.get(k, "") for k in STATUS_PROPERTIES}


def logs_command(scope: Scope, follow: bool = False, lines: int | None = None) -> list[str]:
    argv = ["journalctl", *(["--user"] if scope == "user" else []), "--unit", UNIT_NAME]
    if lines is not None:
        argv += ["--lines", str(lines)]
    if follow:
        argv.append("--follow")
    return argv


def run_foreground(argv: Sequence[str]) -> int:
    """Run a command on this terminal (journalctl -f) and return its exit status."""
    try:
        return subprocess.call(list(argv))
    except FileNotFoundError:
        raise ServiceError(f"{argv[0]} not found: is systemd installed?") from None
    except KeyboardInterrupt:
        return 0
