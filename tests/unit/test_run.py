"""The commands' shared plumbing (sealstream.run): ids given as option values, files named by
options."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealstream.run import glue_values, read_option_file


@pytest.mark.parametrize(
    ("argv", "glued"),
    [
        (["--thumbprint", "-AbC"], ["--thumbprint=-AbC"]),
        (["--thumbprint", "--AbC", "--name", "x"], ["--thumbprint=--AbC", "--name", "x"]),
        (["--thumbprint=-AbC"], ["--thumbprint=-AbC"]),
        (["--thumbprint"], ["--thumbprint"]),  # no value: argparse says so
        (["--", "--thumbprint", "-x"], ["--", "--thumbprint", "-x"]),
    ],
)
def test_an_id_beginning_with_a_dash_stays_the_options_value(
    argv: list[str], glued: list[str]
) -> None:
    assert glue_values(argv, ["--thumbprint"]) == glued


def test_a_missing_file_is_named_with_its_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        read_option_file("--jwk-file", tmp_path / "me.jwk")
    assert str(err.value) == f"--jwk-file {tmp_path / 'me.jwk'}: no such file"
