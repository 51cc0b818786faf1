"""API keys and tenants: where keys come from, how tenant files are validated, and when the
server refuses to start without auth."""

from pathlib import Path

import pytest

from tinyllm.errors import ConfigError
from tinyllm.runtime.server import (
    KEYS_ENV,
    TenantSpec,
    check_exposure,
    host_allowed,
    load_tenants,
)


def write(tmp_path: Path, text: str, name: str = "tenants.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_keys_come_from_the_flag_a_file_and_the_environment(tmp_path: Path) -> None:
    keyfile = write(tmp_path, "# team keys\nsk-file1\n\n  sk-file2  \n", "keys.txt")
    keys = load_tenants(None, ["sk-flag", "sk-flag"], keyfile, {KEYS_ENV: "sk-env, ,sk-file1"})
    assert list(keys) == ["sk-flag", "sk-file1", "sk-file2", "sk-env"]  # each key once
    assert len({spec.name for spec in keys.values()}) == 4  # each its own tenant
    assert load_tenants(None, [], None, {}) is None  # no key anywhere: no auth
    with pytest.raises(ConfigError, match="holds no API key"):
        load_tenants(None, [], write(tmp_path, "# nothing\n\n", "empty.txt"), {})
    with pytest.raises(ConfigError, match="cannot read API keys"):
        load_tenants(None, [], str(tmp_path / "missing.txt"), {})


def test_a_valid_tenant_file_sets_every_field(tmp_path: Path) -> None:
    path = write(tmp_path, "tenants:\n"
                 "  - {name: app, key: sk-app, weight: 3, priority: 1, max_concurrency: 16,"
                 " max_queue: 8}\n"
                 "  - {name: app, key: sk-app-rotated, weight: 3, priority: 1,"
                 " max_concurrency: 16, max_queue: 8}\n"
                 "  - {name: batch, key: sk-batch}\n")  # fmt: skip
    keys = load_tenants(path, [], None, {})
    assert keys["sk-app"] == TenantSpec("app", 3.0, 1, 16, 8) == keys["sk-app-rotated"]
    assert keys["sk-batch"] == TenantSpec("batch")


# nine levels of ten aliases each: 10**9 values once expanded, from under 1 KB of text
BILLION_LAUGHS = "l0: &l0 [x]\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10)
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tenants: []", "at least 1 item"),
        ("tenants:", "tenants"),
        ("{}", "tenants"),
        ("[1, 2]", "the file"),
        ("tenants: [{name: a, key: k, weight: 0}]", "tenants.0.weight"),
        ("tenants: [{name: a, key: k, weight: -1}]", "tenants.0.weight"),
        ("tenants: [{name: a, key: k, weight: .nan}]", "tenants.0.weight"),
        ("tenants: [{name: a, key: k, max_concurrency: 0}]", "tenants.0.max_concurrency"),
        ("tenants: [{name: a, key: k, max_queue: 0}]", "tenants.0.max_queue"),
        ("tenants: [{name: a, key: k, max_concurrency: '4'}]", "tenants.0.max_concurrency"),
        ("tenants: [{name: a, key: 12345}]", "tenants.0.key"),
        ("tenants: [{name: a, key: 'has space'}]", "tenants.0.key"),
        ("tenants: [{name: a}]", "tenants.0.key"),
        ("tenants: [{name: a, key: k, wieght: 2}]", "wieght"),
        ("tenants: [{name: a, key: k}, {name: b, key: k}]", "repeats an API key"),
        ("tenants: [{name: a, key: k1}, {name: a, key: k2, weight: 2}]", "different settings"),
        ("tenants: [{name: a, key: k", "cannot read tenants"),
        ("tenants:\n  - {name: a, key: k1, weight: 1, weight: 50}", "duplicate key"),
        (BILLION_LAUGHS, "expands to more than"),
    ],
)
def test_bad_tenant_files_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="cannot read tenants") as e:
        load_tenants(write(tmp_path, text), [], None, {})
    assert message in str(e.value)


def test_a_key_in_two_sources_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "tenants: [{name: a, key: sk-1}]")
    with pytest.raises(ConfigError, match="give each key once"):
        load_tenants(path, ["sk-1"], None, {})


def test_no_keys_beyond_loopback_needs_insecure(caplog) -> None:
    keys = {"sk": TenantSpec("a")}
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        check_exposure(host, None, insecure=False)
    for host in ("0.0.0.0", "::", "192.168.1.4", "myhost.lan"):
        with pytest.raises(ConfigError, match="--insecure"):
            check_exposure(host, None, insecure=False)
        check_exposure(host, keys, insecure=False)
    check_exposure("0.0.0.0", None, insecure=True)
    assert "no API keys" in caplog.text


def test_serve_refuses_an_open_public_bind_before_loading(monkeypatch) -> None:
    from tinyllm.cli.runtime import serve

    monkeypatch.delenv(KEYS_ENV, raising=False)
    with pytest.raises(ConfigError, match="exposes the server"):
        serve("no-such-model", host="0.0.0.0")


def test_host_header_check() -> None:
    allowed = {"localhost", "llm.lan"}
    for ok in ("localhost", "localhost:8000", "LLM.lan:1", "127.0.0.1:80", "[::1]:8000",
               "10.0.0.7", "llm.lan."):  # fmt: skip
        assert host_allowed(ok, allowed), ok
    for bad in ("evil.com", "evil.com:8000", "127.0.0.1.evil.com", "[::1", "llm.lan.evil"):
        assert not host_allowed(bad, allowed), bad
    assert host_allowed("anything.example", {"*"})


def test_serve_help_documents_the_limits() -> None:
    from typer.testing import CliRunner

    from tinyllm.cli import app

    text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--api-key-file", "--allowed-host", "--insecure", "--public-metrics",
                   "--request-timeout", "--max-queue-wait", "TINYLLM_API_KEYS"):  # fmt: skip
        assert option in text, option
