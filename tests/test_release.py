"""The package as published: metadata, the built sdist and wheel, a fresh install, the workflows.

Everything here runs offline: the wheel is built without build isolation (the test extra brings
setuptools, build and twine) and installed with `--no-deps --no-index` into a fresh virtual
environment, which sees this environment's packages (TensorFlow, Keras, dp-accounting) through a
`.pth` file written after the install, so that only keras_safe comes from the wheel.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from tests import dp_reference

tomllib = pytest.importorskip("tomllib")
yaml = pytest.importorskip("yaml")

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
WORKFLOWS = ROOT / ".github" / "workflows"
# What the wheel is built from (a copy: the build writes metadata next to its sources).
SOURCES = ("pyproject.toml", "setup.cfg", "README.md", "CHANGELOG.md", "LICENSE", "keras_safe")


def _version():
    namespace = {}
    exec((ROOT / "keras_safe" / "_version.py").read_text(), namespace)
    return namespace["__version__"]


def test_project_metadata():
    project = PYPROJECT["project"]
    assert project["name"] == "keras-safe"
    assert project["dynamic"] == ["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", _version())
    urls = project["urls"]
    assert set(urls) >= {"Homepage", "Repository", "Issues", "Changelog", "Documentation"}
    repository = urls["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repository)
    assert all(url.startswith(repository) for url in urls.values()), urls
    assert PYPROJECT["project"]["scripts"] == {"keras-safe": "keras_safe.cli:main"}


def test_changelog_lists_every_released_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (\S+)", changelog, re.M)
    assert headings[0] == "Unreleased"
    assert _version() in headings
    assert "0.1.0" in headings
    released = [tuple(map(int, h.split("."))) for h in headings[1:]]
    assert released == sorted(released, reverse=True), "newest release first"


def _copy_sources(destination):
    destination.mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(
                source, destination / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(source, destination / name)
    return destination


def _clean_env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PIP_NO_INDEX="1")
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    return env


def _run(args, cwd, timeout=600):
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_clean_env(),
        timeout=timeout,
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


SMOKE = textwrap.dedent(
    """
    import importlib.metadata, sys
    import keras_safe
    assert "tensorflow" not in sys.modules, "import keras_safe started TensorFlow"
    assert keras_safe.__file__.startswith(sys.prefix), keras_safe.__file__
    assert importlib.metadata.version("keras-safe") == keras_safe.__version__
    import keras, numpy as np
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(
        optimizer=keras_safe.optimizers.DPSGD(
            learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.1
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    keras_safe.privacy.make_private(model)
    before = model.get_weights()[0].copy()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert not np.allclose(before, model.get_weights()[0])
    print("EPSILON", keras_safe.privacy.get_ledger(model).epsilon(delta=1e-5))
    """
)


@pytest.mark.slow
def test_built_wheel_installs_into_a_fresh_environment_and_trains(tmp_path):
    source = _copy_sources(tmp_path / "source")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source], tmp_path)
    version = _version()
    wheel = dist / f"keras_safe-{version}-py3-none-any.whl"
    sdist = dist / f"keras_safe-{version}.tar.gz"
    assert sorted(p.name for p in dist.iterdir()) == sorted([wheel.name, sdist.name])
    checked = _run([sys.executable, "-m", "twine", "check", "--strict", wheel, sdist], tmp_path)
    assert checked.stdout.count("PASSED") == 2, checked.stdout

    # A fresh environment, without this one's site-packages, gets the wheel alone...
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "--no-compile", wheel],
        tmp_path,
    )  # fmt: skip
    # ...then sees this environment's dependencies (no network), after its own packages.
    fresh_site = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path
    ).stdout.strip()
    pathlib.Path(fresh_site, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    smoke = _run([python, "-c", SMOKE], tmp_path)
    epsilon = float(re.search(r"EPSILON (\S+)", smoke.stdout).group(1))
    # 64 examples in batches of 16: 4 steps at sampling rate 1/4.
    assert epsilon == pytest.approx(dp_reference.epsilon(1.1, 0.25, 4, 1e-5), rel=1e-6)

    help_text = _run([python, "-m", "keras_safe", "--help"], tmp_path)
    assert "epsilon" in help_text.stdout and help_text.stderr == ""
    script = venv / "bin" / "keras-safe"
    statement = _run(
        [script, "epsilon", "--steps", "2250", "--sampling-rate", "0.04", "--noise-multiplier",
         "1.5", "--delta", "1e-5"],
        tmp_path,
    )  # fmt: skip
    assert statement.stdout.startswith("epsilon = 7.329 "), statement.stdout[:200]


# -- the workflows: YAML syntax and the steps that must be there ------------------------------


def _load(name):
    return yaml.safe_load((WORKFLOWS / name).read_text())


def _triggers(workflow):
    # YAML 1.1 reads the key `on` as True.
    return workflow.get("on", workflow.get(True))


def _steps(job):
    return job.get("steps", [])


def _runs(job):
    return "\n".join(step.get("run", "") for step in _steps(job))


def ci_problems(workflow):
    """What the CI workflow lacks: run on pushes and pull requests, .ci/run within CI's time."""
    problems = []
    triggers = _triggers(workflow) or {}
    for event in ("push", "pull_request"):
        if event not in triggers:
            problems.append(f"not run on {event}")
    jobs = workflow.get("jobs", {})
    runners = [job for job in jobs.values() if re.search(r"(^|\s)bash \.ci/run\b", _runs(job))]
    if not runners:
        problems.append("no job runs bash .ci/run")
    for job in runners:
        if not any(str(s.get("uses", "")).startswith("actions/checkout@") for s in _steps(job)):
            problems.append("the .ci/run job does not check out the repository")
        if job.get("timeout-minutes", 361) > 90:
            problems.append("the .ci/run job may run past 90 minutes")
    return problems


def release_problems(workflow):
    """What the release workflow lacks: tags only, build and check, trusted publishing."""
    problems = []
    triggers = _triggers(workflow) or {}
    tags = (triggers.get("push") or {}).get("tags") if isinstance(triggers, dict) else None
    if not tags or set(triggers) != {"push"}:
        problems.append("not run on version tags only")
    jobs = workflow.get("jobs", {})
    builders = [name for name, job in jobs.items() if "python -m build" in _runs(job)]
    if not builders:
        problems.append("no job runs python -m build")
    elif not any("twine check" in _runs(jobs[name]) for name in builders):
        problems.append("the build is not checked with twine check")
    publishers = [
        (name, job)
        for name, job in jobs.items()
        if any("pypa/gh-action-pypi-publish" in str(s.get("uses", "")) for s in _steps(job))
    ]
    if not publishers:
        problems.append("nothing publishes with pypa/gh-action-pypi-publish")
    for name, job in publishers:
        if (job.get("permissions") or {}).get("id-token") != "write":
            problems.append(f"{name}: trusted publishing needs permissions id-token: write")
        needs = job.get("needs", [])
        if not set([needs] if isinstance(needs, str) else needs) & set(builders):
            problems.append(f"{name}: does not wait for the build")
        for step in _steps(job):
            given = step.get("with") or {}
            if "password" in given or "api-token" in given:
                problems.append(f"{name}: a stored token instead of trusted publishing")
    if (workflow.get("permissions") or {}).get("id-token") == "write":
        problems.append("id-token: write for every job, not only the publishing one")
    return problems


def test_workflows_are_valid_yaml_with_the_steps_they_need():
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) == ["ci.yml", "release.yml"]
    assert ci_problems(_load("ci.yml")) == []
    assert release_problems(_load("release.yml")) == []


def test_release_tag_check_reads_the_version_file():
    build = _load("release.yml")["jobs"]["build"]
    assert "keras_safe/_version.py" in _runs(build)
    assert "GITHUB_REF_NAME" in _runs(build)


def test_workflow_checks_find_what_is_missing():
    ci = _load("ci.yml")
    ci["jobs"]["tests"]["steps"] = [s for s in _steps(ci["jobs"]["tests"]) if "run" not in s]
    assert "no job runs bash .ci/run" in ci_problems(ci)
    ci = _load("ci.yml")
    del _triggers(ci)["pull_request"]
    assert ci_problems(ci) == ["not run on pull_request"]

    release = _load("release.yml")
    del release["jobs"]["publish"]["permissions"]
    assert any("id-token" in p for p in release_problems(release))
    release = _load("release.yml")
    release["jobs"]["publish"]["steps"][-1]["with"] = {"password": "${{ secrets.TOKEN }}"}
    assert any("stored token" in p for p in release_problems(release))
    release = _load("release.yml")
    release["jobs"]["build"]["steps"] = [
        s for s in _steps(release["jobs"]["build"]) if "twine check" not in s.get("run", "")
    ]
    assert "the build is not checked with twine check" in release_problems(release)
    release = _load("release.yml")
    _triggers(release)["pull_request"] = None
    assert "not run on version tags only" in release_problems(release)
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load((WORKFLOWS / "ci.yml").read_text().replace("jobs:", "jobs: [", 1))
