"""``aimx dkim-keygen``: key files, modes, the printed record, --force and errors."""

from __future__ import annotations

import base64
import stat

import pytest
from cryptography.hazmat.primitives import serialization

from aimx.cli.main import main
from aimx.ops import dkimkeys
from tests.support.users import run_aimx_as

CONFIG = """\
domain = "keys.example"
dkim_selector = "s2024"

[mailboxes.catchall]
address = "*@keys.example"
owner = "aimx-catchall"
"""


@pytest.fixture
def config_dir(instance_dirs, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    (instance_dirs["config"] / "config.toml").write_text(CONFIG)
    return instance_dirs["config"]


def _spki_b64(public_pem: bytes) -> str:
    der = serialization.load_pem_public_key(public_pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_key_pair_files_modes_and_record(config_dir, capsys):
    assert main(["dkim-keygen"]) == 0
    out = capsys.readouterr().out
    private, public = config_dir / "dkim/private.key", config_dir / "dkim/public.key"
    assert (_mode(private), _mode(public)) == (0o600, 0o644)
    assert private.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")  # PKCS#1
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")  # SPKI
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    assert key.key_size == 2048
    p_value = _spki_b64(public.read_bytes())
    assert out.startswith(
        "DKIM keypair generated successfully.\n\n"
        "Add this DNS TXT record:\n"
        "  s2024._domainkey.keys.example\n"
        f"  v=DKIM1; k=rsa; p={p_value}\n")
    assert not list((config_dir / "dkim").glob(".*"))  # no temp files left behind


def test_long_record_is_also_offered_as_255_byte_strings(config_dir, capsys):
    main(["dkim-keygen"])
    out = capsys.readouterr().out
    quoted = out.rstrip("\n").splitlines()[-1].strip()
    parts = [part.strip('"') for part in quoted.split('" "')]
    assert len(parts) == 2 and all(len(part.encode()) <= 255 for part in parts)
    value = "v=DKIM1; k=rsa; p=" + _spki_b64((config_dir / "dkim/public.key").read_bytes())
    assert "".join(parts) == value
    assert "a DNS string holds at most 255" in out


def test_existing_key_is_kept_with_a_warning(config_dir, capsys):
    main(["dkim-keygen"])
    capsys.readouterr()
    before = (config_dir / "dkim/private.key").read_bytes()
    assert main(["dkim-keygen", "--selector", "s2024"]) == 0  # the signing selector, named
    captured = capsys.readouterr()
    assert captured.err == "Warning: DKIM keys already exist. Use --force to overwrite.\n"
    assert captured.out.startswith("Add this DNS TXT record:\n  s2024._domainkey.keys.example\n")
    assert (config_dir / "dkim/private.key").read_bytes() == before


def test_another_selector_gets_its_own_key_and_the_signing_key_is_untouched(config_dir, capsys):
    main(["dkim-keygen"])
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (config_dir / "dkim").iterdir()}
    assert main(["dkim-keygen", "--selector", "s2025"]) == 0
    out = capsys.readouterr().out
    private, public = config_dir / "dkim/s2025.private.key", config_dir / "dkim/s2025.public.key"
    assert (_mode(private), _mode(public)) == (0o600, 0o644)
    record = f"v=DKIM1; k=rsa; p={_spki_b64(public.read_bytes())}"
    assert f"  s2025._domainkey.keys.example\n  {record}\n" in out
    assert "Outgoing mail is still signed with selector 's2024'" in out
    assert "`sudo aimx dkim rotate s2025`" in out
    assert {p.name: p.read_bytes() for p in (config_dir / "dkim").iterdir()
            if p.name in before} == before
    assert _spki_b64(public.read_bytes()) != _spki_b64(before["public.key"])


@pytest.mark.parametrize("selector", ["../etc", "a/b", ".hidden", "-x", "a..b", "x y", "é"])
def test_selector_names_that_are_not_dns_labels_are_refused(config_dir, capsys, selector):
    assert main(["dkim-keygen", f"--selector={selector}"]) == 2
    assert f"Error: invalid selector '{selector}'" in capsys.readouterr().err
    assert not (config_dir / "dkim").exists()


def test_force_replaces_the_key(config_dir, capsys):
    main(["dkim-keygen"])
    before = (config_dir / "dkim/public.key").read_bytes()
    capsys.readouterr()
    assert main(["dkim-keygen", "--force"]) == 0
    after = (config_dir / "dkim/public.key").read_bytes()
    assert after != before
    assert f"p={_spki_b64(after)}\n" in capsys.readouterr().out
    assert _mode(config_dir / "dkim/private.key") == 0o600


def test_record_matches_what_setup_and_doctor_read(config_dir, capsys):
    main(["dkim-keygen"])
    printed = capsys.readouterr().out.splitlines()[4].strip()
    assert printed == dkimkeys.record_value(dkimkeys.local_public_b64(config_dir / "dkim"))


def test_a_config_with_unrelated_errors_still_names_the_domain(config_dir, capsys):
    (config_dir / "config.toml").write_text(CONFIG + "typo_key = 1\n")
    assert main(["dkim-keygen"]) == 0
    assert "  s2024._domainkey.keys.example\n" in capsys.readouterr().out


def test_missing_config_is_an_error(instance_dirs, capsys):
    assert main(["dkim-keygen"]) == 1
    path = instance_dirs["config"] / "config.toml"
    assert capsys.readouterr().err == (f"Error: Config file not found at {path}. "
                                       "Run 'sudo aimx setup' first\n")


def test_permission_denied_explains_the_way_out(test_users, config_dir):
    config_dir.chmod(0o755)
    (config_dir / "config.toml").chmod(0o644)
    alice = test_users["alice"]
    result = run_aimx_as(alice, ["dkim-keygen"], alice.env(), input="")
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: Permission denied writing to {config_dir / 'dkim'}. Run `sudo aimx "
        "dkim-keygen`, or set `AIMX_CONFIG_DIR=<writable-path>` and rerun `aimx dkim-keygen` "
        "for development.\n")
    assert not (config_dir / "dkim").exists()
