"""Configuration: located errors, ${ENV}, secrets as files, schema, unique ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import json_schema, load_config, load_config_text
from edge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

SINK = """
sinks:
  - id: erp
    type: http
    url: http://127.0.0.1:9/api
    routes:
      - {events: [lot.status], method: PUT, path: "/lots/{data.lot_id}/status"}
      - {events: ["*"], method: GET, path: /events}
"""


def _issues(text: str, **kw) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config_text(text, **kw)
    return [str(i) for i in err.value.issues]


def test_error_names_the_field_and_the_allowed_values():
    assert _issues("site: p\n" + SINK) == [
        "sinks[0].routes[1].method: must be one of POST, PUT, PATCH, got 'GET'"]


def test_every_error_is_reported_at_once():
    issues = _issues("site: p\noutbox: {synchronous: fast, bogus: 1}\n" + SINK)
    assert "outbox.synchronous: must be one of full, normal, got 'fast'" in issues
    assert any(i.startswith("outbox.bogus: unknown key (allowed: synchronous,") for i in issues)
    assert len(issues) == 3


def test_unknown_component_type_lists_the_known_ones():
    [issue] = _issues("site: p\nsinks: [{id: x, type: kafka}]\n")
    assert issue.startswith("sinks[0]: type must be one of ")
    assert "http" in issue and "'kafka'" in issue
    [issue] = _issues("site: p\nsinks: [{id: x}]\n")
    assert issue.startswith("sinks[0]: missing key 'type' (one of ")


def test_env_substitution_with_default_and_missing_variable(tmp_path: Path):
    text = "site: ${SITE}\nstate_dir: ${STATE:-/var/lib/x}\n"
    cfg = load_config_text(text, env={"SITE": "plant-07"})
    assert (cfg.site, cfg.state_dir) == ("plant-07", "/var/lib/x")
    assert _issues(text, env={}) == ["site: environment variable SITE is not set"]


def test_secret_files_resolve_relative_to_the_config_and_must_exist(tmp_path: Path):
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "erp").write_text("s")
    body = SINK.replace("method: GET", "method: POST") + \
        "    auth: {type: bearer, token_file: \"${CREDENTIALS_DIRECTORY}/erp\"}\n"
    cfg_path = tmp_path / "edge.yaml"
    cfg_path.write_text("site: p\n" + body)
    cfg = load_config(cfg_path, env={"CREDENTIALS_DIRECTORY": "creds"})
    assert cfg.sinks[0].auth.token_file == str(tmp_path / "creds" / "erp")
    with pytest.raises(ConfigError) as err:
        load_config(cfg_path, env={"CREDENTIALS_DIRECTORY": "nowhere"})
    assert str(err.value.issues[0]).startswith("sinks[0].auth.token_file: file not found")
    # checking on another machine: paths need not exist
    load_config(cfg_path, env={"CREDENTIALS_DIRECTORY": "nowhere"}, check_files=False)


def test_inline_secret_headers_are_refused():
    body = SINK.replace("method: GET", "method: POST") + \
        "    headers: {Authorization: Bearer abc}\n"
    [issue] = _issues("site: p\n" + body)
    assert issue.startswith("sinks[0].headers: Authorization: secrets are not allowed inline")


def test_api_on_a_non_loopback_address_needs_a_token():
    [issue] = _issues("site: p\napi: {listen: '0.0.0.0:8080'}\n")
    assert "token_file is required" in issue
    load_config_text("site: p\napi: {listen: '[::1]:8080'}\n")


def test_component_ids_are_unique_across_sources_and_sinks():
    body = SINK.replace("method: GET", "method: POST")
    text = "site: p\n" + body + body.replace("sinks:\n", "")
    [issue] = _issues(text)
    assert "sinks[1].id 'erp' is already used by sinks[0]" in issue


def test_yaml_syntax_error_has_a_line_number():
    [issue] = _issues("site: p\nsinks: [\n")
    assert issue.startswith("line ") and "invalid YAML" in issue


def test_batched_route_cannot_use_data_fields_in_its_path():
    body = SINK.replace('{events: ["*"], method: GET, path: /events}',
                        '{events: ["*"], path: "/lots/{data.lot_id}", max_batch: 10}')
    [issue] = _issues("site: p\n" + body)
    assert issue.startswith("sinks[0].routes[1]: ")


def test_schema_includes_components_and_forbids_unknown_keys():
    schema = json_schema()
    text = json.dumps(schema)
    assert "HttpSinkConfig" in text and '"additionalProperties": false' in text


def test_check_config_cli_prints_located_errors_and_exits_2(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: p\n" + SINK)
    proc = subprocess.run([sys.executable, "-m", "edge", "check-config", str(bad)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "sinks[0].routes[1].method: must be one of POST, PUT, PATCH, got 'GET'" in proc.stderr
    good = tmp_path / "good.yaml"
    good.write_text("site: p\n" + SINK.replace("method: GET", "method: POST"))
    proc = subprocess.run([sys.executable, "-m", "edge", "check-config", str(good)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("OK")


def test_run_with_bad_config_exits_2_without_starting(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"site: p\nstate_dir: {tmp_path / 's'}\n" + SINK)
    proc = subprocess.run([sys.executable, "-m", "edge", "run", "-c", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "sinks[0].routes[1].method" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_example_configs_are_valid():
    for name in ("plant.example.yaml", "demo.yaml", "relay.example.yaml"):
        path = ROOT / "config" / name
        cfg = load_config(path, check_files=False, env={"CREDENTIALS_DIRECTORY": "/run/creds"})
        assert hasattr(cfg, "relay") == (name == "relay.example.yaml")


def test_published_schema_matches_the_code():
    """config/edge.schema.json is what editors validate against: regenerate it with
    `make schema` whenever a config model changes."""
    published = json.loads((ROOT / "config" / "edge.schema.json").read_text())
    assert published == json.loads(json.dumps(json_schema()))
