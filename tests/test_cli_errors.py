"""The one error table (commands/errors.py): what commands raise becomes a message and an exit code."""

from __future__ import annotations

import importlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from iota_cli import output
from iota_cli.app import app
from iota_cli.commands import errors


def test_every_name_in_the_table_is_an_exception_class():
    for dotted, _ in errors.TABLE:
        importlib.import_module(dotted.rpartition(".")[0])
        kind = errors.resolve(dotted)
        assert kind is not None and issubclass(kind, Exception), dotted


def test_codes_and_hints_come_from_the_exception_where_it_has_them():
    from iota_cli.config.settings import SettingsError
    from iota_cli.train.errors import ApiError, Stopped
    from iota_cli.train.join import JoinError

    def code(e: Exception) -> int:
        how = errors.known(e)
        assert how is not None, e
        return how.exit_code(e)

    assert code(SettingsError("bad")) == output.EXIT_CONFIG
    assert code(JoinError("no stage", code=output.EXIT_UNAVAILABLE)) == output.EXIT_UNAVAILABLE
    assert errors.known(JoinError("x", hint="do y")).hint_for(JoinError("x", hint="do y")) == "do y"
    assert code(ApiError(403, "no")) == output.EXIT_CONFIG and code(ApiError(404, "no")) == output.EXIT_FAIL
    assert code(Stopped("going")) == output.EXIT_UNAVAILABLE  # a subclass takes its base's entry
    assert errors.known(RuntimeError("a bug")) is None  # unknown: keeps its traceback


class Refuses(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.dumps({"detail": "no such run"}).encode()
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_refusal_is_reported_with_the_servers_words(refusing_server):
    args = ["orchestrator", "run", "stop", "r1", "--url", refusing_server, "--admin-token", "t"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == output.EXIT_FAIL, r.output
    assert (
        "error: the orchestrator refused: HTTP 404: no such run" in r.stderr and "Traceback" not in r.stderr
    )


def test_an_orchestrator_that_is_gone_exits_69_and_names_its_url():
    r = CliRunner().invoke(app, ["orchestrator", "status", "--url", "http://127.0.0.1:9"])
    assert r.exit_code == output.EXIT_UNAVAILABLE, r.output
    assert "http://127.0.0.1:9" in r.stderr and "unreachable" in r.stderr


def test_a_config_file_that_cannot_be_read_exits_78_with_a_hint():
    from iota_cli.config import settings

    path = settings.paths().config_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("orchestrator = [")
    for args in (["doctor"], ["join"], ["status"], ["config", "show"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == output.EXIT_CONFIG, (args, r.output)
        assert "not valid TOML" in r.stderr and "hint: fix or delete the config file" in r.stderr, args
