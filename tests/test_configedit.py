"""config.toml rewrites: minimal edits, validation first, atomic writes that keep ownership."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from aimx import configedit
from aimx.config import Hook, is_valid_username, load_config
from aimx.configedit import ConfigEditError, write_config_text
from tests.support.users import needs_root

USER = next(
    entry.pw_name for entry in pwd.getpwall()
    if entry.pw_uid != 0 and is_valid_username(entry.pw_name)
)

ORIGINAL = f"""# aimx configuration (hand-maintained)
domain = "test.com"  # our mail domain
trust = "none"

[mailboxes.catchall]
address = "*@test.com"
owner = "aimx-catchall"

# Alice's agent
[mailboxes.alice]
address = "alice@test.com"
owner = "{USER}"

[[mailboxes.alice.hooks]]
event = "on_receive"
cmd = ["/bin/echo", "hi"]

[[mailboxes.alice.hooks]]
name = "archive"
event = "after_send"
cmd = ["/usr/bin/true"]  # keep quiet

[mailboxes.bob]
address = "bob@test.com"
owner = "{USER}"

# Release channel: do not touch
[upgrade]
release_manifest_url = "https://releases.test/manifest.json"  # pinned
"""

UNRELATED = (
    "# Release channel: do not touch\n[upgrade]\n"
    'release_manifest_url = "https://releases.test/manifest.json"  # pinned\n'
)
ALICE = f"""# Alice's agent
[mailboxes.alice]
address = "alice@test.com"
owner = "{USER}"

[[mailboxes.alice.hooks]]
event = "on_receive"
cmd = ["/bin/echo", "hi"]

[[mailboxes.alice.hooks]]
name = "archive"
event = "after_send"
cmd = ["/usr/bin/true"]  # keep quiet

"""
ALICE_FIRST_HOOK = '[[mailboxes.alice.hooks]]\nevent = "on_receive"\ncmd = ["/bin/echo", "hi"]\n\n'
BOB_TAIL = f'[mailboxes.bob]\naddress = "bob@test.com"\nowner = "{USER}"\n\n'


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "config.toml"
    path.parent.mkdir()
    path.write_text(ORIGINAL)
    path.chmod(0o640)
    return path


def leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# Each verb once, as (callable, the text it must leave behind).
VERBS = {
    "add_mailbox": (
        lambda p, **kw: configedit.add_mailbox(p, "carol", "carol@test.com", USER, **kw),
        ORIGINAL.replace(
            BOB_TAIL,
            BOB_TAIL + f'[mailboxes.carol]\naddress = "carol@test.com"\nowner = "{USER}"\n\n',
        ),
    ),
    "remove_mailbox": (
        lambda p, **kw: configedit.remove_mailbox(p, "alice", **kw),
        ORIGINAL.replace(ALICE, ""),
    ),
    "add_hook": (
        lambda p, **kw: configedit.add_hook(
            p, "bob", Hook("on_receive", ["/usr/local/bin/triage", "--fast"],
                           fire_on_untrusted=True, timeout_secs=30), **kw),
        ORIGINAL.replace(
            BOB_TAIL,
            BOB_TAIL + '[[mailboxes.bob.hooks]]\nevent = "on_receive"\n'
            'cmd = ["/usr/local/bin/triage", "--fast"]\nfire_on_untrusted = true\n'
            "timeout_secs = 30\n\n",
        ),
    ),
    "remove_hook": (
        lambda p, **kw: configedit.remove_hook(p, "alice", "9f5503741a28", **kw),
        ORIGINAL.replace(ALICE_FIRST_HOOK, ""),
    ),
}


# --------------------------------------------------------------------------- minimal edits

@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verb_changes_only_its_own_table(cfg, verb):
    edit, expected = VERBS[verb]
    edit(cfg)
    text = cfg.read_text()
    assert text == expected
    assert text.startswith("# aimx configuration (hand-maintained)\n"
                           'domain = "test.com"  # our mail domain\n')
    assert text.endswith("\n" + UNRELATED)
    assert leftovers(cfg) == []


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verb_returns_the_new_config_with_the_override_kept_out_of_the_file(
        cfg, tmp_path, verb):
    edit, _ = VERBS[verb]
    override = tmp_path / "elsewhere-data"
    config = edit(cfg, data_dir_override=override)
    assert config.data_dir == override
    assert str(override) not in cfg.read_text()
    assert "data_dir" not in cfg.read_text()
    assert load_config(cfg).data_dir == Path("/var/lib/aimx")
    assert config == load_config(cfg, data_dir_override=override)


def test_new_hook_lands_after_the_mailboxs_last_hook(cfg):
    config = configedit.add_hook(cfg, "alice", Hook("after_send", ["/bin/log"], name="log"))
    new_hook = '[[mailboxes.alice.hooks]]\nname = "log"\nevent = "after_send"\ncmd = ["/bin/log"]\n'
    assert cfg.read_text() == ORIGINAL.replace(
        'cmd = ["/usr/bin/true"]  # keep quiet\n\n',
        'cmd = ["/usr/bin/true"]  # keep quiet\n\n' + new_hook + "\n",
    )
    assert [h.effective_name for h in config.mailbox("alice").hooks] == [
        "9f5503741a28", "archive", "log",
    ]


def test_default_hook_fields_are_not_written(cfg):
    configedit.add_hook(cfg, "bob", Hook("on_receive", ["/bin/x"], fire_on_untrusted=False,
                                         timeout_secs=60, type="cmd"))
    assert ORIGINAL.replace(BOB_TAIL, BOB_TAIL + '[[mailboxes.bob.hooks]]\n'
                            'event = "on_receive"\ncmd = ["/bin/x"]\n\n') == cfg.read_text()


def test_remove_hook_by_explicit_name_and_the_mailbox_loses_it(cfg):
    config = configedit.remove_hook(cfg, "alice", "archive")
    assert cfg.read_text() == ORIGINAL.replace(
        '[[mailboxes.alice.hooks]]\nname = "archive"\nevent = "after_send"\n'
        'cmd = ["/usr/bin/true"]  # keep quiet\n\n', "")
    assert config.find_hook("archive") is None
    assert config.find_hook("9f5503741a28") is not None


def test_removing_a_mailbox_takes_its_hooks(cfg):
    config = configedit.remove_mailbox(cfg, "alice")
    assert config.mailbox("alice") is None
    assert config.all_hooks() == ()


def test_add_then_remove_restores_the_file_byte_for_byte(cfg):
    configedit.add_mailbox(cfg, "a.b", None, USER)
    assert '[mailboxes."a.b"]\naddress = "a.b@test.com"\n' in cfg.read_text()
    assert load_config(cfg).mailbox("a.b").address == "a.b@test.com"
    configedit.add_hook(cfg, "a.b", Hook("on_receive", ["/bin/say", 'quote " and \\']))
    assert load_config(cfg).mailbox("a.b").hooks[0].cmd == ("/bin/say", 'quote " and \\')
    name = load_config(cfg).mailbox("a.b").hooks[0].effective_name
    configedit.remove_hook(cfg, "a.b", name)
    configedit.remove_mailbox(cfg, "a.b")
    assert cfg.read_text() == ORIGINAL


def test_removing_the_last_table_leaves_one_final_newline(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(f'domain = "test.com"\n\n[mailboxes.a]\naddress = "a@test.com"\n'
                    f'owner = "{USER}"\n\n\n[mailboxes.b]\naddress = "b@test.com"\n'
                    f'owner = "{USER}"\n')
    configedit.remove_mailbox(path, "b")
    assert path.read_text() == (
        f'domain = "test.com"\n\n[mailboxes.a]\naddress = "a@test.com"\nowner = "{USER}"\n'
    )


def test_first_mailbox_goes_to_the_end_of_a_file_without_newline(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('domain = "test.com"  # no newline at end')
    configedit.add_mailbox(path, "alice", "alice@test.com", USER)
    assert path.read_text() == (
        'domain = "test.com"  # no newline at end\n\n'
        f'[mailboxes.alice]\naddress = "alice@test.com"\nowner = "{USER}"\n'
    )


def test_crlf_files_stay_crlf(tmp_path):
    path = tmp_path / "config.toml"
    original = f'domain = "test.com"\r\n\r\n[mailboxes.a]\r\naddress = "a@test.com"\r\n' \
               f'owner = "{USER}"\r\n'
    path.write_bytes(original.encode())
    configedit.add_hook(path, "a", Hook("on_receive", ["/bin/x"]))
    assert path.read_bytes() == (original + '\r\n[[mailboxes.a.hooks]]\r\n'
                                 'event = "on_receive"\r\ncmd = ["/bin/x"]\r\n').encode()


def test_inline_hook_arrays_are_edited_in_place(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        '# inline style\ndomain = "test.com"\n\n[mailboxes.a]\naddress = "a@test.com"\n'
        f'owner = "{USER}"\nhooks = [{{ event = "on_receive", cmd = ["/bin/one"] }}]  # one\n'
        '\n# tail\n[upgrade]\nrelease_manifest_url = "x"\n'
    )
    config = configedit.add_hook(path, "a", Hook("after_send", ["/bin/two"], name="two"))
    assert [h.effective_name for h in config.mailbox("a").hooks][1] == "two"
    text = path.read_text()
    assert text.startswith('# inline style\ndomain = "test.com"\n\n[mailboxes.a]\n')
    assert text.endswith('\n# tail\n[upgrade]\nrelease_manifest_url = "x"\n')
    assert "[[mailboxes.a.hooks]]" not in text
    first = config.mailbox("a").hooks[0].effective_name
    config = configedit.remove_hook(path, "a", first)
    assert [h.name for h in config.mailbox("a").hooks] == ["two"]
    assert path.read_text().endswith('\n# tail\n[upgrade]\nrelease_manifest_url = "x"\n')


def test_inline_mailboxes_table_is_edited_in_place(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(f'domain = "test.com"  # d\nmailboxes = {{ a = {{ address = "a@test.com", '
                    f'owner = "{USER}" }} }}\n# end\n')
    config = configedit.add_mailbox(path, "b", "b@test.com", USER)
    assert list(config.mailboxes) == ["a", "b"]
    config = configedit.remove_mailbox(path, "a")
    assert list(config.mailboxes) == ["b"]
    text = path.read_text()
    assert text.startswith('domain = "test.com"  # d\n') and text.endswith("\n# end\n")


def test_hand_edits_on_disk_are_kept(cfg):
    load_config(cfg)  # the snapshot a daemon would hold
    cfg.write_text(ORIGINAL + '\n[mailboxes.dave]\naddress = "dave@test.com"\n'
                   f'owner = "{USER}"\n')
    config = configedit.add_mailbox(cfg, "carol", None, USER)
    assert list(config.mailboxes) == ["catchall", "alice", "bob", "dave", "carol"]


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(("edit", "code", "reason"), [
    (lambda p: configedit.add_mailbox(p, "bob", "bob@test.com", USER),
     "MAILBOX", "mailbox 'bob' already exists"),
    (lambda p: configedit.remove_mailbox(p, "carol"),
     "MAILBOX", "mailbox 'carol' does not exist"),
    (lambda p: configedit.remove_mailbox(p, "catchall"),
     "MAILBOX", "cannot delete the catchall mailbox"),
    (lambda p: configedit.add_hook(p, "carol", Hook("on_receive", ["/bin/x"])),
     "ENOENT", "mailbox 'carol' does not exist (race with concurrent MAILBOX-DELETE)"),
    (lambda p: configedit.remove_hook(p, "alice", "nope"), "ENOENT", "hook 'nope' not found"),
    (lambda p: configedit.remove_hook(p, "bob", "archive"), "ENOENT", "hook 'archive' not found"),
    (lambda p: configedit.add_mailbox(p, "carol", "carol@test.com", "root"), "VALIDATION",
     "mailbox 'carol' cannot be owned by root; use a regular Linux user or set "
     "'allow_root_catchall = true' on a catchall mailbox"),
    (lambda p: configedit.add_hook(p, "bob", Hook("on_receive", ["/bin/x"], timeout_secs=601)),
     "VALIDATION", "hook '<anonymous>' on mailbox 'bob' has `timeout_secs = 601` which exceeds "
     "the max of 600"),
    (lambda p: configedit.add_hook(p, "bob", Hook("on_receive", ["/bin/echo", "hi"])),
     "VALIDATION", "anonymous hooks on mailboxes 'alice' and 'bob' have identical event/cmd and "
     "derive the same name '9f5503741a28': set an explicit `name` on at least one to "
     "disambiguate"),
    (lambda p: configedit.add_hook(p, "bob", Hook("after_send", ["/bin/x"], name="archive")),
     "VALIDATION", "duplicate hook name 'archive' on mailboxes 'alice' and 'bob': hook names "
     "must be unique across the mailboxes of one owner"),
    (lambda p: configedit.add_hook(p, "catchall", Hook("on_receive", ["/bin/x"])),
     "VALIDATION", "mailbox 'catchall' is the catchall but has hooks attached; catchall does "
     "not support hooks"),
])
def test_refused_edits_write_nothing(cfg, edit, code, reason):
    before = os.stat(cfg)
    with pytest.raises(ConfigEditError) as caught:
        edit(cfg)
    assert (caught.value.code, caught.value.reason) == (code, reason)
    assert cfg.read_text() == ORIGINAL
    after = os.stat(cfg)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert leftovers(cfg) == []


def test_a_catchall_under_another_name_cannot_be_removed(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('domain = "test.com"\n[mailboxes.fallback]\naddress = "*@TEST.COM"\n'
                    'owner = "aimx-catchall"\n')
    with pytest.raises(ConfigEditError) as caught:
        configedit.remove_mailbox(path, "fallback")
    assert caught.value.code == "MAILBOX"


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_unparsable_file_on_disk_is_io_and_untouched(cfg, verb):
    broken = ORIGINAL.replace('trust = "none"', 'trust = "none')
    cfg.write_text(broken)
    edit, _ = VERBS[verb]
    with pytest.raises(ConfigEditError) as caught:
        edit(cfg)
    assert caught.value.code == "IO"
    assert caught.value.reason.startswith(f"failed to parse {cfg}: ")
    assert cfg.read_text() == broken
    assert leftovers(cfg) == []


def test_missing_file_is_io(tmp_path):
    with pytest.raises(ConfigEditError) as caught:
        configedit.add_mailbox(tmp_path / "none.toml", "a", None, USER)
    assert caught.value.code == "IO"
    assert not (tmp_path / "none.toml").exists()


# --------------------------------------------------------------------------- the atomic writer

@pytest.mark.parametrize("verb", sorted(VERBS))
def test_mode_is_preserved(cfg, verb):
    cfg.chmod(0o604)
    VERBS[verb][0](cfg)
    assert cfg.stat().st_mode & 0o7777 == 0o604


@needs_root
@pytest.mark.parametrize("verb", sorted(VERBS))
def test_owner_and_group_are_preserved(cfg, verb):
    os.chown(cfg, 65534, 65534)
    cfg.chmod(0o460)
    VERBS[verb][0](cfg)
    info = cfg.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (65534, 65534, 0o460)


def test_a_new_file_is_0640_and_root_owned(tmp_path):
    path = tmp_path / "config.toml"
    write_config_text(path, 'domain = "test.com"\n')
    info = path.stat()
    assert info.st_mode & 0o7777 == 0o640
    assert (info.st_uid, info.st_gid) == ((0, 0) if os.geteuid() == 0 else
                                          (os.geteuid(), os.getegid()))
    assert load_config(path).domain == "test.com"


def test_the_writer_keeps_a_symlinked_config_a_symlink(tmp_path):
    real = tmp_path / "managed" / "aimx.toml"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "config.toml"
    link.symlink_to(real)
    write_config_text(link, "new\n")
    assert link.is_symlink() and real.read_text() == "new\n"


def test_failed_rename_leaves_no_temp_file(tmp_path):
    target = tmp_path / "config.toml"
    target.mkdir()  # a directory cannot be replaced by a file
    (target / "keep").write_text("x")
    with pytest.raises(ConfigEditError) as caught:
        write_config_text(target, 'domain = "test.com"\n')
    assert caught.value.code == "IO"
    assert caught.value.reason.startswith(f"failed to write {target}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]
    assert (target / "keep").read_text() == "x"


@needs_root
def test_failed_rename_during_a_verb_keeps_the_old_file(cfg):
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(cfg)],
                                        capture_output=True).returncode != 0:
        pytest.skip("needs chattr +i support on this filesystem")
    try:
        with pytest.raises(ConfigEditError) as caught:
            configedit.add_mailbox(cfg, "carol", None, USER)
        assert caught.value.code == "IO"
        assert "Operation not permitted" in caught.value.reason
        assert cfg.read_text() == ORIGINAL
        assert leftovers(cfg) == []
    finally:
        subprocess.run([chattr, "-i", str(cfg)], check=True)


def test_lookalike_headers_inside_values_are_not_tables(tmp_path):
    path = tmp_path / "config.toml"
    tricky_hook = (
        "[[mailboxes.a.hooks]]\n"
        'name = "tricky"\n'
        'event = "on_receive"\n'
        "cmd = [\n"
        '  "/bin/sh",\n'
        "  # [mailboxes.fake] in a comment\n"
        "  '''\n[mailboxes.fake]\n''',\n"
        '  """\n[[mailboxes.a.hooks]]\\"""",\n'
        "]\n\n"
    )
    original = (
        f'domain = "test.com"\n\n[mailboxes.a]\naddress = "a@test.com"\nowner = "{USER}"\n\n'
        + tricky_hook
        + f'# b\n[mailboxes.b]\naddress = "b@test.com"\nowner = "{USER}"\n'
    )
    path.write_text(original)
    hooks = load_config(path).mailbox("a").hooks
    assert len(hooks) == 1 and hooks[0].cmd[1:] == ("[mailboxes.fake]\n", "[[mailboxes.a.hooks]]\"")
    configedit.remove_hook(path, "a", "tricky")
    assert path.read_text() == original.replace(tricky_hook, "")
    config = configedit.add_mailbox(path, "c", None, USER)
    assert list(config.mailboxes) == ["a", "b", "c"]


def test_set_dkim_selector_changes_only_the_value_and_keeps_the_comment(tmp_path):
    path = tmp_path / "config.toml"
    text = ('# top\ndomain = "d.example"\ndkim_selector = "aimx"   # signing key\n'
            'trust = "none"\n\n[mailboxes.catchall]\naddress = "*@d.example"\nowner = "root"\n'
            'allow_root_catchall = true\n')
    path.write_text(text)
    config = configedit.set_dkim_selector(path, "s2026")
    assert config.dkim_selector == "s2026"
    assert path.read_text() == text.replace('"aimx"   #', '"s2026"   #')


def test_set_dkim_selector_adds_the_key_after_domain_when_absent(tmp_path):
    path = tmp_path / "config.toml"
    text = ('domain = "d.example"\n\n[mailboxes.x]\naddress = "*@d.example"\nowner = "root"\n'
            'allow_root_catchall = true\n')
    path.write_text(text)
    configedit.set_dkim_selector(path, "s2")
    added = text.replace('"d.example"\n', '"d.example"\ndkim_selector = "s2"\n', 1)
    assert path.read_text() == added
    assert load_config(path).dkim_selector == "s2"


def test_an_invalid_selector_is_refused_and_nothing_is_written(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('domain = "d.example"\n')
    with pytest.raises(ConfigEditError) as err:
        configedit.set_dkim_selector(path, "../key")
    assert err.value.code == "VALIDATION" and "invalid dkim_selector '../key'" in err.value.reason
    assert path.read_text() == 'domain = "d.example"\n'
