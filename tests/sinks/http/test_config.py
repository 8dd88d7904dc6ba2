"""HTTP sink config checked at load, with located errors: no inline secrets anywhere (URL,
sink and route headers, OAuth2 token URL), batched routes send envelopes, safe paths."""

from __future__ import annotations

import textwrap

import pytest

from edge.config import load_config_text
from edge.errors import ConfigError


def _sink(url: str = "https://erp.example.com/api/v1", *, routes: str | None = None,
          extra: str = "") -> str:
    routes = routes or '[{events: ["*"], method: POST, path: /events, max_batch: 100}]'
    return textwrap.dedent(f"""\
        site: p
        sinks:
          - id: erp
            type: http
            url: "{url}"
            routes: {routes}
        """) + textwrap.indent(textwrap.dedent(extra), " " * 4)


def _issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config_text(text, check_files=False)
    return [str(i) for i in err.value.issues]


def _ok(text: str) -> None:
    load_config_text(text, check_files=False)


# ------------------------------------------------------------------ the sink URL


@pytest.mark.parametrize("url", [
    "https://gateway:s3cret@erp.example.com/api/v1",
    "https://gateway@erp.example.com/api/v1",
    "http://:s3cret@127.0.0.1:8080",
])
def test_credentials_in_the_sink_url_are_refused(url):
    [issue] = _issues(_sink(url))
    assert issue.startswith("sinks[0].url: credentials are not allowed inline")
    assert "s3cret" not in issue


@pytest.mark.parametrize("param", ["api_key", "apikey", "key", "token", "access_token",
                                   "secret", "password", "sig", "signature", "API_KEY",
                                   "Token", "SIG", "client_secret", "x-api-key",
                                   "auth_token"])
def test_secret_looking_query_parameters_in_the_sink_url_are_refused(param):
    [issue] = _issues(_sink(f"https://erp.example.com/api/v1?plant=7&{param}=abc123"))
    assert issue.startswith(f"sinks[0].url: query parameter {param!r} looks like a secret")
    assert "abc123" not in issue


def test_harmless_query_parameters_are_fine():
    _ok(_sink("https://erp.example.com/api/v1?plant=7&version=2"))


# ------------------------------------------------------------------ headers


SECRET_HEADERS = ["Authorization", "proxy-authorization", "Cookie", "X-API-Key", "Api-Key",
                  "X-Apikey", "X-Auth-Token", "X-Client-Secret", "X-Password"]


@pytest.mark.parametrize("name", SECRET_HEADERS)
def test_secret_headers_are_refused_at_sink_level(name):
    [issue] = _issues(_sink(extra=f"headers: {{{name}: abc123}}"))
    assert issue.startswith(f"sinks[0].headers: {name}: secrets are not allowed inline")
    assert "abc123" not in issue


@pytest.mark.parametrize("name", SECRET_HEADERS)
def test_secret_headers_are_refused_at_route_level(name):
    """Before, only the sink-level headers were checked."""
    routes = ('[{events: [quality.hold], method: PUT, path: "/lots/{data.lot_id}"}, '
              f'{{events: ["*"], path: /events, headers: {{{name}: abc123}}}}]')
    [issue] = _issues(_sink(routes=routes))
    assert issue.startswith(f"sinks[0].routes[1].headers: {name}: secrets are not allowed inline")


def test_ordinary_headers_are_fine_at_both_levels():
    _ok(_sink(routes='[{events: ["*"], path: /events, headers: {X-Plant: "07"}}]',
              extra="headers: {X-Gateway: edge-07, Accept-Language: de}"))


# ------------------------------------------------------------------ OAuth2 token URL


@pytest.mark.parametrize(("token_url", "message"), [
    ("https://gateway:s3cret@login.example.com/token", "credentials are not allowed inline"),
    ("https://login.example.com/token?client_secret=s3cret",
     "query parameter 'client_secret' looks like a secret"),
    ("https://login.example.com/token?Password=s3cret",
     "query parameter 'Password' looks like a secret"),
])
def test_oauth2_token_url_with_a_secret_is_refused(token_url, message):
    [issue] = _issues(_sink(extra=f"""\
        auth: {{type: oauth2_client_credentials, token_url: "{token_url}",
               client_id: gateway, client_secret_file: secret}}
        """))
    assert issue.startswith(f"sinks[0].auth.token_url: {message}")
    assert "s3cret" not in issue


def test_oauth2_token_url_without_secrets_is_fine():
    _ok(_sink(extra="""\
        auth: {type: oauth2_client_credentials, token_url: "https://login.example.com/token?tenant=7",
               client_id: gateway, client_secret_file: secret}
        """))


# ------------------------------------------------------------------ batches and paths


def test_a_batched_route_must_send_the_envelope():
    """``body: data`` drops the event id: a receiver could not dedupe a split batch."""
    routes = ('[{events: [quality.hold], method: PUT, path: "/lots/{data.lot_id}", body: data}, '
              '{events: ["*"], path: /events, max_batch: 100, body: data}]')
    assert _issues(_sink(routes=routes)) == [
        "sinks[0].routes[1].body: a batched route (max_batch > 1) must send the envelope "
        "so every element carries its id"]


@pytest.mark.parametrize("path", ["/a/../events", "/./events", "/events/..", "/a//b"])
def test_a_route_path_with_dot_or_empty_segments_is_refused(path):
    [issue] = _issues(_sink(routes=f'[{{events: ["*"], path: "{path}"}}]'))
    assert issue.startswith("sinks[0].routes[0].path: ")


@pytest.mark.parametrize("name", ["Idempotency-Key", "x-correlation-id", "traceparent"])
def test_headers_the_gateway_sets_itself_cannot_be_configured(name):
    routes = f'[{{events: ["*"], path: /events, headers: {{{name}: fixed}}}}]'
    [issue] = _issues(_sink(routes=routes))
    assert issue == f"sinks[0].routes[0].headers: {name}: set by the gateway on every request; " \
                    "remove it"


def test_a_secret_in_a_route_path_query_is_refused():
    [issue] = _issues(_sink(routes='[{events: ["*"], path: "/events?api_key=abc123"}]'))
    assert issue.startswith("sinks[0].routes[0].path: query parameter 'api_key' looks like")
    assert "abc123" not in issue
