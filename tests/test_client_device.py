"""Asset tag rules: DMI system serial, else board serial, else a tag from the EK."""

from __future__ import annotations

import hashlib

import pytest

from client.device import asset_tag, collect, meaningful_serial, tpm_asset_tag


@pytest.mark.parametrize(
    "value",
    ["", "To Be Filled By O.E.M.", "Default string", "0000000", "Not Specified", None, "a b"],
)
def test_placeholders_are_not_serials(value):
    assert meaningful_serial(value) is None


def write_dmi(tmp_path, product=None, board=None):
    for name, value in (("product_serial", product), ("board_serial", board)):
        if value is not None:
            (tmp_path / name).write_text(value + "\n")
    return tmp_path


def test_system_serial_first(tmp_path):
    assert asset_tag(b"ek", write_dmi(tmp_path, "PF2ABCDE", "BOARD1")) == "PF2ABCDE"


def test_board_serial_when_system_serial_is_a_placeholder(tmp_path):
    dmi = write_dmi(tmp_path, "To Be Filled By O.E.M.", "BOARD1")
    assert asset_tag(b"ek", dmi) == "BOARD1"


def test_tpm_tag_when_no_serial(tmp_path):
    tag = asset_tag(b"ek-der", write_dmi(tmp_path, "", "Default string"))
    assert tag == "tpm-" + hashlib.sha256(b"ek-der").hexdigest()[:16] == tpm_asset_tag(b"ek-der")


def test_collect_reports_strings_and_honours_override():
    data = collect(b"ek-der", tag_override="LAPTOP-1")
    assert data["asset_tag"] == "LAPTOP-1" and data["os_type"] == "linux"
    assert data["ek_pub_hash"] == hashlib.sha256(b"ek-der").hexdigest()
    assert all(isinstance(v, str) for v in data.values())
