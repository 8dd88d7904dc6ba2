"""A small Dockerfile reader for the container tests: instructions per stage, with line
continuations joined and comment lines dropped (as BuildKit reads them)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.arm64"


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, HEALTHCHECK ...
    args: str  # the rest of the line, continuations joined

    def exec_form(self) -> list[str]:
        """The JSON (exec) form of ENTRYPOINT / CMD."""
        value = json.loads(self.args)
        assert isinstance(value, list), f"{self.keyword} is not in exec form: {self.args}"
        return [str(v) for v in value]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]

    def commands(self) -> list[list[str]]:
        """Every shell command of the stage's RUN lines, split on && into words."""
        out = []
        for run in self.all("RUN"):
            words = [w for w in shlex.split(run.args) if not w.startswith("--mount=")]
            command: list[str] = []
            for word in [*words, "&&"]:
                if word == "&&":
                    if command:
                        out.append(command)
                    command = []
                else:
                    command.append(word)
        return out


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        [found] = [s for s in self.stages if s.name == name]
        return found


def instructions(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append(Instruction(keyword.upper(), " ".join(args.split())))
    return out


def parse(path: Path = DOCKERFILE) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions(path.read_text()):
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert ins.keyword == "ARG", f"{ins.keyword} before the first FROM"
            key, _, value = ins.args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append(ins)
    return Dockerfile(global_args, stages)


def options(args: str) -> tuple[dict[str, str], str]:
    """``--name=value`` options at the start of an instruction's arguments, and the rest."""
    found: dict[str, str] = {}
    rest = args
    while m := re.match(r"--([a-z-]+)=(\S+)\s*", rest):
        found[m.group(1)] = m.group(2)
        rest = rest[m.end():]
    return found, rest


def seconds(duration: str) -> float:
    """A Docker / compose duration (``300s``, ``1m30s``, ``45s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)
