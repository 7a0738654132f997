"""nfqfw.docs: the man pages and the bash completion match the real options and policy keys,
render without groff warnings, and complete what a user types."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nfqfw import cli
from nfqfw.core import config
from nfqfw.core.config import ConfigError, parse_policy
from nfqfw.docs import __main__ as docs_main
from nfqfw.docs import completion, manpage, policy

GROFF = shutil.which("groff") or "groff"  # groff-base: make bootstrap installs it


# --- nfqfw-policy(5) --------------------------------------------------------------------------


def test_every_policy_key_is_documented_and_nothing_else() -> None:
    documented = {part: tuple(keys) for part, keys in policy.KEYS.items()}
    assert set(documented["top"]) == set(config.TOP_KEYS)
    assert set(documented["zones"]) == set(config.ZONES)
    assert set(documented["zone"]) == set(config.ZONE_KEYS)
    assert set(documented["defaults"]) == set(config.DEFAULT_KEYS)
    assert set(documented["rule"]) == set(config.RULE_KEYS)
    assert set(documented["nat"]) == set(config.NAT_KEYS)
    assert set(documented["masquerade"]) == set(config.MASQUERADE_KEYS)
    assert set(documented["snat"]) == set(config.SNAT_KEYS)
    assert set(documented["forward"]) == set(config.FORWARD_KEYS)
    assert set(documented["options"]) == set(config.OPTION_KEYS)
    assert set(documented["set"]) == set(config.SET_KEYS)


RULE = "  - {{name: r, proto: tcp, limit: 1/second, {key}: zzz{action}}}\n"
CHOICE_POLICIES = {
    "defaults": lambda key: f"zones: {{external: [wan0]}}\ndefaults: {{{key}: zzz}}\n",
    "options": lambda key: f"zones: {{external: [wan0]}}\noptions: {{{key}: zzz}}\n",
    "rule": lambda key: (
        "zones: {external: [wan0]}\ningress:\n"
        + RULE.format(key=key, action="" if key == "action" else ", action: accept")
    ),
    "masquerade": lambda key: (
        f"zones: {{external: [wan0]}}\nnat:\n  masquerade:\n    - {{out: wan0, {key}: zzz}}\n"
    ),
    "forward": lambda key: (
        "zones: {external: [wan0], internal: {interfaces: [lan0], networks: [10.0.0.0/24]}}\nnat:\n"
        f"  forward:\n    - {{name: f, proto: tcp, ports: 25, to: 10.0.0.25, {key}: zzz}}\n"
    ),
}


CHOICES = re.compile(r"([a-z0-9]+(?: \| [a-z0-9]+)+)(?: \(required\))?")
CHOICE_KEYS = [
    (part, key)
    for part in CHOICE_POLICIES
    for key, (syntax, _) in policy.KEYS[part].items()
    if CHOICES.fullmatch(syntax)
]


def test_the_choice_keys_are_found() -> None:
    expected = {
        ("options", "failure-mode"),
        ("rule", "action"),
        ("rule", "family"),
        ("defaults", "invalid"),
        ("defaults", "between"),
        ("masquerade", "family"),
        ("forward", "pass"),
        ("forward", "hairpin"),
    }
    assert expected <= set(CHOICE_KEYS)


@pytest.mark.parametrize(("part", "key"), CHOICE_KEYS)
def test_documented_choices_are_what_the_validator_accepts(part: str, key: str) -> None:
    """The validator's own message for a wrong value lists its choices: the page must list the same."""
    with pytest.raises(ConfigError) as err:
        parse_policy(CHOICE_POLICIES[part](key))
    message = next(str(issue) for issue in err.value.issues if key in str(issue))
    expected = re.search(r"expected (.+?), got", message)
    assert expected, message
    accepted = set(re.split(r", | or ", expected.group(1)))
    choices = CHOICES.fullmatch(policy.KEYS[part][key][0])
    assert choices and set(choices.group(1).split(" | ")) == accepted


def test_log_format_lists_every_format() -> None:
    assert policy.KEYS["options"]["log-format"][0] == " | ".join(config.LOG_FORMATS)


# --- nfqfw(8) ---------------------------------------------------------------------------------


def test_the_man_page_has_every_command_and_option() -> None:
    page = manpage.render().replace("\\-", "-")
    leaves = list(manpage.leaves(cli.build_parser()))
    assert ("rules", "show") in [words for words, _ in leaves] and ("lab", "up") in [w for w, _ in leaves]
    for words, parser in leaves:
        assert f'.SS "nfqfw {" ".join(words)}"' in page
        for action in manpage.options_of(parser):
            for option in action.option_strings:
                assert re.search(rf"\\fB[^\n]*{re.escape(option)}\b", page), (words, option)
    for code in (0, 1, 2, 3):
        assert f".TP\n\\fB{code}\\fR\n" in page


def test_a_command_added_later_appears_by_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    real = cli.build_parser

    def with_one_more() -> object:
        parser = real()
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        extra = sub.add_parser("zone", help="zones")  # type: ignore[attr-defined]
        extra.add_argument("--frobnicate", help="a new option")
        return parser

    monkeypatch.setattr(manpage, "build_parser", with_one_more)
    monkeypatch.setattr(completion, "build_parser", with_one_more)
    assert "\\-\\-frobnicate" in manpage.render()
    assert "--frobnicate" in completion.render()


@pytest.mark.parametrize("render", [manpage.render, policy.render], ids=["nfqfw.8", "nfqfw-policy.5"])
def test_pages_render_without_groff_warnings(render: object, tmp_path: Path) -> None:
    page = tmp_path / "page"
    page.write_text(render())  # type: ignore[operator]
    done = subprocess.run([GROFF, "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (0, "")
    shown = subprocess.run([GROFF, "-man", "-Tutf8", str(page)], capture_output=True, text=True).stdout
    text = re.sub(".\b", "", shown)  # the overstrike of bold and underlined text
    assert "NAME" in text and "SEE ALSO" in text


# --- bash completion --------------------------------------------------------------------------


def complete(script: Path, *words: str) -> list[str]:
    """COMPREPLY for the command line `words` (the last one being completed)."""
    quoted = " ".join(f"'{word}'" for word in words)
    program = (
        f"source {script}\nCOMP_WORDS=({quoted}); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))\n"
        '_nfqfw; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    done = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if line]


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "nfqfw"
    path.write_text(completion.render())
    return path


def test_completion_of_commands_options_and_values(script: Path, tmp_path: Path) -> None:
    assert complete(script, "nfqfw", "") == list(cli.COMMANDS)
    assert complete(script, "nfqfw", "fl") == ["flows", "flush"]
    assert complete(script, "nfqfw", "status", "--") == ["--help", "--json", "--quiet", "--runtime-dir"]
    assert complete(script, "nfqfw", "rules", "") == ["show", "remove", "counters", "install-closed"]
    assert complete(script, "nfqfw", "rules", "show", "--j") == ["--json"]
    assert complete(script, "nfqfw", "flows", "--state", "ES") == ["ESTABLISHED"]
    assert complete(script, "nfqfw", "flush", "--proto", "") == ["icmp", "icmpv6", "tcp", "udp"]
    assert complete(script, "nfqfw", "panic", "") == ["on", "off"]
    assert complete(script, "nfqfw", "explain", "--hook", "f") == ["forward"]


def test_completion_of_interfaces_from_the_policy(script: Path, tmp_path: Path) -> None:
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text("zones:\n  external: [wanx9]\n  internal: [lanx9, dmzx9]\n")
    found = complete(script, "nfqfw", "explain", "--config", str(policy_file), "--in", "")
    assert {"wanx9", "lanx9", "dmzx9", "lo"} <= set(found)
    assert complete(script, "nfqfw", "explain", "--config", str(policy_file), "--in", "lan") == ["lanx9"]
    policy_file.write_text(
        "zones:\n  external: [wanx9]  # outside\n  internal:\n    interfaces: [lanx9]\n"
        "  dmz: {faces: inside, interfaces: ['dmzx9', wgx9], networks: [10.0.2.0/24]}\n"
    )
    found = complete(script, "nfqfw", "explain", "--config", str(policy_file), "--in", "")
    assert {"wanx9", "lanx9", "dmzx9", "wgx9"} <= set(found)
    assert not {"outside", "networks:", "10.0.2.0/24", "#"} & set(found)


def test_python_m_nfqfw_docs_writes_the_three_files(tmp_path: Path) -> None:
    assert docs_main.main([str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "nfqfw-policy.5",
        "nfqfw.8",
        "nfqfw.bash-completion",
    ]
