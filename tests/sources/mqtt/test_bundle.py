"""The ``mqtt`` source's bundle agrees with its code: every option of the config model (the
nested subscription and TLS models included) is documented in ``README.md``, and
``sample.yaml`` and the README's example load as a gateway config.

A README that drifts from the code is a defect: these tests fail when an option is added
without documenting it, or when the sample stops loading or leaves an option out.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

import edge.sources.mqtt
from edge.config import SourceConfigBase, deprecations, load_config_text
from edge.sources.mqtt import MqttSourceConfig, SubscriptionConfig
from tests.support import config_models, config_options

BUNDLE = Path(edge.sources.mqtt.__file__).parent
README = (BUNDLE / "README.md").read_text()
ENV = {"CREDENTIALS_DIRECTORY": "/run/credentials/edge-gateway.service"}


MODELS = config_models(MqttSourceConfig)
OPTIONS = config_options(MODELS)


def test_the_walk_reaches_every_nested_model() -> None:
    assert {"MqttSourceConfig", "SubscriptionConfig", "TlsConfig"} <= set(MODELS)


@pytest.mark.parametrize(("model", "option"), OPTIONS)
def test_every_option_is_in_the_readme(model: str, option: str) -> None:
    assert f"`{option}`" in README, f"{model}.{option} is not documented in {BUNDLE}/README.md"


def test_every_deprecated_name_is_in_the_readme() -> None:
    missing = [old for model in MODELS.values() for old in getattr(model, "renamed_keys", {})
               if f"`{old}`" not in README]
    assert not missing, f"deprecated names not in {BUNDLE}/README.md: {missing}"


def _load(sources_block: str) -> typing.Any:
    return load_config_text("site: plant-01\n" + sources_block, env=ENV, check_files=False)


def test_the_sample_is_a_complete_source() -> None:
    cfg = _load((BUNDLE / "sample.yaml").read_text())
    assert deprecations(cfg) == []
    [src] = cfg.sources
    assert isinstance(src, MqttSourceConfig)
    assert src.password_file == ENV["CREDENTIALS_DIRECTORY"] + "/mqtt"
    assert src.tls is not None and src.tls.ca_file
    # every key of the source is set, and every subscription key in some subscription
    own = set(MqttSourceConfig.model_fields) - set(SourceConfigBase.model_fields)
    assert own - src.model_fields_set == set()
    used = set().union(*(s.model_fields_set for s in src.subscriptions))
    assert set(SubscriptionConfig.model_fields) - used == set()


def test_the_readme_example_loads() -> None:
    [example] = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)
    [src] = _load(example).sources
    assert isinstance(src, MqttSourceConfig)
