"""config_io: choices typed as Literal are validated, and YAML booleans never pass for strings."""
import dataclasses
from typing import Literal, Optional

import pytest

from megatron_ultralong.config_io import apply_overrides, from_dict
from megatron_ultralong.parallel.runtime import ParallelConfig


@dataclasses.dataclass(frozen=True)
class _Section:
    name: str = "x"
    mode: Literal["none", "full"] = "none"
    level: Optional[Literal[1, 2]] = None


def _build(*overrides):
    return from_dict(_Section, apply_overrides({}, overrides), "sec")


def test_literal_fields_name_the_field_and_the_choices():
    assert _build("mode=full").mode == "full"
    with pytest.raises(ValueError, match=r"^sec\.mode='fast': expected one of \['none', 'full'\]$"):
        _build("mode=fast")
    with pytest.raises(ValueError, match=r"sec\.level=True: expected one of \[1, 2\]"):
        _build("level=yes")  # True == 1 in Python; the Literal must not accept it
    with pytest.raises(ValueError, match=r"parallel\.cp_comm_type='ring': expected one of \['p2p', 'all_gather', 'a2a'\]"):
        from_dict(ParallelConfig, {"cp_comm_type": "ring"}, "parallel")


@pytest.mark.parametrize("raw", ["off", "yes", "no", "on", "false"])
def test_yaml_booleans_for_string_fields_are_explained(raw):
    with pytest.raises(ValueError, match=r"sec\.name=(True|False): expected str \(YAML read an unquoted"):
        _build(f"name={raw}")
    with pytest.raises(ValueError, match=r"sec\.mode=(True|False): expected one of \['none', 'full'\] \(YAML read"):
        _build(f"mode={raw}")
    assert _build(f"name='{raw}'").name == raw  # quoted, it is the string


def test_train_config_choices_are_validated():
    from megatron_ultralong.training.config import load_train_config

    with pytest.raises(ValueError, match=r"model\.recompute='partial': expected one of \['none', 'selective', 'full'\]"):
        load_train_config(None, ("data.paths=[x]", "model.recompute=partial"))
