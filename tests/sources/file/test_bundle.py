"""The ``file`` source's bundle agrees with its code: every option of the config model (the
nested file entry included) is documented in ``README.md``, and ``sample.yaml`` and the
README's example load as a gateway config.

A README that drifts from the code is a defect: these tests fail when an option is added
without documenting it, or when the sample stops loading or leaves an option out.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

import edge.sources.file
from edge.config import SourceConfigBase, deprecations, load_config_text
from edge.sources.file import FileEntryConfig, FileSourceConfig
from tests.support import config_models, config_options

BUNDLE = Path(edge.sources.file.__file__).parent
README = (BUNDLE / "README.md").read_text()

MODELS = config_models(FileSourceConfig)
OPTIONS = config_options(MODELS)


def test_the_walk_reaches_every_nested_model() -> None:
    assert {"FileSourceConfig", "FileEntryConfig"} <= set(MODELS)


@pytest.mark.parametrize(("model", "option"), OPTIONS)
def test_every_option_is_in_the_readme(model: str, option: str) -> None:
    assert f"`{option}`" in README, f"{model}.{option} is not documented in {BUNDLE}/README.md"


def _load(sources_block: str) -> typing.Any:
    return load_config_text("site: plant-01\n" + sources_block, check_files=False)


def test_the_sample_is_a_complete_source() -> None:
    cfg = _load((BUNDLE / "sample.yaml").read_text())
    assert deprecations(cfg) == []
    [src] = cfg.sources
    assert isinstance(src, FileSourceConfig)
    # every key of the source is set, and every entry key in some entry
    own = set(FileSourceConfig.model_fields) - set(SourceConfigBase.model_fields)
    assert own - src.model_fields_set == set()
    used = set().union(*(e.model_fields_set for e in src.files))
    assert set(FileEntryConfig.model_fields) - used == set()


def test_the_readme_example_loads() -> None:
    [example] = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)
    [src] = _load(example).sources
    assert isinstance(src, FileSourceConfig)


def test_every_reject_reason_the_code_can_give_is_in_the_readme() -> None:
    code = "".join((BUNDLE / f).read_text() for f in ("parse.py", "source.py"))
    reasons = set(re.findall(r'FileRejected\(\s*"([a-z_]+)"', code))
    assert reasons >= {"too_large", "too_many_rows", "bad_encoding", "all_rows_invalid"}
    missing = [r for r in sorted(reasons) if f"`{r}`" not in README]
    assert not missing, f"reject reasons not in {BUNDLE}/README.md: {missing}"
