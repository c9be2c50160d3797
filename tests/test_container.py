"""The container image (packaging/Containerfile) and the compose example.

The file checks always run: the image must persist exactly the directories the
code defaults to, run the twistd plugin this package ships, install from the lock
with hashes, and the compose example's front end must be an address the example
config trusts. With a working container runtime (podman, or docker with its
daemon up) the image is built and one message delivered into it; otherwise that
test skips and says why.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import smtplib
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from aimx import paths
from aimx.config import parse_config_text
from tests.support.dkimkeys import shared_key

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
CONTAINERFILE = PACKAGING / "Containerfile"
COMPOSE = PACKAGING / "compose.yaml"
EXAMPLE_CONFIG = PACKAGING / "container-config.example.toml"
VOLUMES = {str(paths.DEFAULT_CONFIG_DIR), str(paths.DEFAULT_DATA_DIR),
           str(paths.DEFAULT_RUNTIME_DIR)}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Containerfile: comments dropped, continued
    lines joined."""
    joined = re.sub(r"\\\n(?:[ \t]*#[^\n]*\n)*", " ", text)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def only(steps: list[tuple[str, str]], name: str) -> str:
    found = [args for word, args in steps if word == name]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def copied_sources(steps: list[tuple[str, str]]) -> list[str]:
    sources = []
    for word, args in steps:
        if word == "COPY":
            sources += shlex.split(args)[:-1]
    return sources


def ignored(name: str) -> bool:
    """Whether the build context (.dockerignore, allow-list style) leaves ``name`` out."""
    verdict = False
    for rule in (REPO / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        pattern = rule.lstrip("!")
        if pattern == "*" or pattern == name:
            verdict = not negated
    return verdict


# -- the files ---------------------------------------------------------------------------


def test_containerfile_runs_the_shipped_plugin_with_the_code_default_volumes() -> None:
    steps = instructions(CONTAINERFILE.read_text())
    assert set(json.loads(only(steps, "VOLUME"))) == VOLUMES
    assert only(steps, "EXPOSE") == "25"
    cmd = json.loads(only(steps, "CMD"))
    # twistd in the foreground, running the plugin twisted/plugins/aimx_plugin.py declares.
    plugin = re.search(r'ServiceMaker\(\s*"([^"]+)"',
                       (REPO / "twisted/plugins/aimx_plugin.py").read_text()).group(1)
    assert cmd[:2] == ["twistd", "-n"] and cmd[-1] == plugin == "aimx"
    logger = next(arg for arg in cmd if arg.startswith("--logger="))
    module, _, name = logger.removeprefix("--logger=").rpartition(".")
    assert callable(getattr(__import__(module, fromlist=[name]), name))
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert "--require-hashes -r requirements.lock" in runs
    assert "--no-deps" in runs  # aimx itself adds nothing the lock did not pin
    for source in copied_sources(steps):
        assert (REPO / source).exists(), source
        assert not ignored(source), f"{source} is left out of the build context"


def test_healthcheck_probes_the_smtp_greeting() -> None:
    check = only(instructions(CONTAINERFILE.read_text()), "HEALTHCHECK")
    argv = json.loads(check[check.index("CMD") + 3:])
    assert argv[:2] == ["python", "-c"]
    code = compile(argv[2], "<healthcheck>", "exec")  # valid Python, not just a string
    assert "('127.0.0.1', 25)" in argv[2] and "b'220 '" in argv[2] and code


def test_example_config_trusts_exactly_the_front_end() -> None:
    config = parse_config_text(EXAMPLE_CONFIG.read_text(), EXAMPLE_CONFIG)
    assert config.smtp_proxy_protocol
    haproxy = (PACKAGING / "haproxy.cfg").read_text()
    server = re.search(r"^\s*server\s+\S+\s+(\S+):25\s+(.*)$", haproxy, re.M)
    assert server is not None and "send-proxy-v2" in server.group(2).split()
    front = re.search(r"front:.*?ipv4_address:\s*([0-9.]+)", COMPOSE.read_text(), re.S)
    assert front is not None
    networks = config.trusted_proxy_networks()
    assert any(ipaddress.ip_address(front.group(1)) in net for net in networks)
    aimx_address = re.search(r"\n  aimx:.*?ipv4_address:\s*([0-9.]+)", COMPOSE.read_text(),
                             re.S).group(1)
    assert not any(ipaddress.ip_address(aimx_address) in net for net in networks)


def test_compose_example_matches_the_image() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: compose.yaml not "
                                              "loaded")
    compose = yaml.safe_load(COMPOSE.read_text())
    aimx = compose["services"]["aimx"]
    assert (COMPOSE.parent / aimx["build"]["context"] / aimx["build"]["dockerfile"]).resolve() \
        == CONTAINERFILE
    assert {volume.split(":")[1] for volume in aimx["volumes"]} == VOLUMES
    front = compose["services"]["front"]
    mount = next(v for v in front["volumes"] if v.startswith("./haproxy.cfg:"))
    assert (COMPOSE.parent / mount.split(":")[0]).is_file()
    subnet = ipaddress.ip_network(compose["networks"]["mail"]["ipam"]["config"][0]["subnet"])
    assert ipaddress.ip_address(front["networks"]["mail"]["ipv4_address"]) in subnet


# -- the image, when a runtime is here -------------------------------------------------------


def container_runtime() -> tuple[str | None, str]:
    """A runtime that can build and run images here, or None and the reason there is none."""
    reasons = []
    for name in ("podman", "docker"):
        exe = shutil.which(name)
        if exe is None:
            reasons.append(f"{name} not installed")
            continue
        try:
            probe = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            reasons.append(f"`{name} info` did not answer in 30 s")
            continue
        if probe.returncode == 0:
            return exe, ""
        detail = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        reasons.append(f"`{name} info` failed: {detail}")
    return None, "; ".join(reasons)


@pytest.fixture(scope="module")
def runtime() -> str:
    exe, reason = container_runtime()
    if exe is None:
        pytest.skip(f"no usable container runtime: {reason}")
    return exe


def test_image_receives_one_message(runtime: str, tmp_path: Path) -> None:
    tag = f"aimx-test:{uuid.uuid4().hex[:12]}"
    name = f"aimx-test-{uuid.uuid4().hex[:12]}"
    subprocess.run([runtime, "build", "-f", str(CONTAINERFILE), "-t", tag, str(REPO)],
                   check=True, capture_output=True, timeout=1800)
    config_dir, data_dir = tmp_path / "etc", tmp_path / "data"
    (config_dir / "dkim").mkdir(parents=True)
    data_dir.mkdir()
    (config_dir / "config.toml").write_text(
        'domain = "container.test"\n\n[mailboxes.catchall]\n'
        'address = "*@container.test"\nowner = "aimx-catchall"\n')
    key = config_dir / "dkim" / "private.key"
    key.write_bytes(shared_key("container").private_pem)
    key.chmod(0o600)
    try:
        subprocess.run([runtime, "run", "-d", "--name", name,
                        "-v", f"{config_dir}:/etc/aimx", "-v", f"{data_dir}:/var/lib/aimx",
                        "-p", "127.0.0.1::25", tag], check=True, capture_output=True,
                       timeout=120)
        published = subprocess.run([runtime, "port", name, "25/tcp"], check=True,
                                   capture_output=True, text=True, timeout=30).stdout
        port = int(published.split()[0].rpartition(":")[2])
        deadline = time.monotonic() + 60
        while True:
            try:
                client = smtplib.SMTP("127.0.0.1", port, timeout=10)
                break
            except (OSError, smtplib.SMTPException):
                if time.monotonic() > deadline:
                    logs = subprocess.run([runtime, "logs", name], capture_output=True,
                                          text=True, timeout=30)
                    raise AssertionError(
                        f"no SMTP greeting:\n{logs.stdout}{logs.stderr}") from None
                time.sleep(0.5)
        with client:
            client.sendmail("bob@example.com", ["agent@container.test"],
                            b"From: bob@example.com\r\nTo: agent@container.test\r\n"
                            b"Subject: into the container\r\n\r\nHello.\r\n")
        stored = list((data_dir / "inbox" / "catchall").rglob("*.md"))
        assert len(stored) == 1
        assert 'subject = "into the container"' in stored[0].read_text()
    finally:
        subprocess.run([runtime, "rm", "-f", name], capture_output=True, timeout=120)
        subprocess.run([runtime, "rmi", "-f", tag], capture_output=True, timeout=120)
