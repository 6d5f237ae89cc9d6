"""`dsv3 make-tiny` and `dsv3 convert --to-bf16` from the command line."""

from __future__ import annotations

import pytest

from dsv3.cli import main
from dsv3.model.weights import load_checkpoint


def test_make_tiny_then_convert(tmp_path, capsys):
    with pytest.raises(SystemExit) as made:
        main(["make-tiny", str(tmp_path / "fp8"), "--seed", "3"])
    assert made.value.code == 0 and "wrote a tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit) as converted:
        main(["convert", "--to-bf16", str(tmp_path / "fp8"), str(tmp_path / "bf16")])
    assert converted.value.code == 0
    assert load_checkpoint(tmp_path / "fp8").config.quantization is not None
    assert load_checkpoint(tmp_path / "bf16").config.quantization is None
    assert (tmp_path / "bf16" / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="already unquantized"):
        main(["convert", "--to-bf16", str(tmp_path / "bf16"), str(tmp_path / "again")])
