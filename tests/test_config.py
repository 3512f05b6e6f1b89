"""npg.config: key=value overrides are parsed by each field's type, Optional fields included."""
from dataclasses import dataclass
from typing import Optional

import pytest

from npg.config import apply_overrides


@dataclass
class Example:
    path: Optional[str] = None
    count: Optional[int] = None
    scale: Optional[float] = 2.0
    box: list | None = None
    name: str = "a"
    flag: bool = False
    rate: float = 1.0


def test_overrides_follow_the_field_types():
    config = apply_overrides(Example(), ["path=/tmp/flows", "count=7", "scale=0.5", "box=[0, 1, 2]", "name=b",
                                         "flag=yes", "rate=3"])
    assert config == Example(path="/tmp/flows", count=7, scale=0.5, box=[0, 1, 2], name="b", flag=True, rate=3.0)
    assert isinstance(config.count, int) and isinstance(config.rate, float)


def test_optional_fields_can_be_cleared():
    config = apply_overrides(Example(path="x", count=3, scale=1.0, box=[1]), ["path=none", "count=null", "scale=None", "box=null"])
    assert config == Example(path=None, count=None, scale=None, box=None)


def test_bad_values_and_keys_name_the_key():
    with pytest.raises(ValueError, match="'count'"):
        apply_overrides(Example(), ["count=many"])
    with pytest.raises(ValueError, match="unknown config key 'colour'"):
        apply_overrides(Example(), ["colour=red"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(Example(), ["flag"])
