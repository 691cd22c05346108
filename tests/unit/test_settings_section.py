"""common.config._settings.load_section: one section of LAB_HOME/config.yaml with its file:line."""

from __future__ import annotations

import pytest

from lab.common.config._settings import SETTINGS_FILE, load_section
from lab.common.errors import ConfigError


def _write(home, text):
    (home / SETTINGS_FILE).write_text(text)
    return home


def test_absent_file_empty_file_and_absent_key_are_none(tmp_path):
    assert load_section(tmp_path, "dns") is None
    assert load_section(_write(tmp_path, ""), "dns") is None
    assert load_section(_write(tmp_path, "server: 10.0.0.1:7443\n"), "dns") is None


def test_section_comes_with_file_and_line(tmp_path):
    value, source, line = load_section(_write(tmp_path, "server: x\n\npxe:\n  interface: eth1\n"), "pxe")
    assert value == {"interface": "eth1"}
    assert value.line_of("interface") == 4
    assert (source, line) == (str(tmp_path / SETTINGS_FILE), 3)


def test_empty_key_gives_none_value(tmp_path):
    assert load_section(_write(tmp_path, "dns:\n"), "dns") == (None, str(tmp_path / SETTINGS_FILE), 1)


def test_not_a_mapping_is_a_config_error_with_the_file(tmp_path):
    with pytest.raises(ConfigError, match="lab settings must be a mapping") as info:
        load_section(_write(tmp_path, "- a\n- b\n"), "dns")
    assert info.value.file == str(tmp_path / SETTINGS_FILE)
