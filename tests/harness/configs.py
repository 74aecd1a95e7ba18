"""Config tests' one assertion shape: a config refused as INVALID_CONFIG."""
from __future__ import annotations

import pytest

from cni_fan.cni.errors import INVALID_CONFIG, CniError
from cni_fan.config import FanConfig


def refused(raw: dict, parse=FanConfig.from_dict) -> CniError:
    """The CniError `parse(raw)` raises, asserted to be INVALID_CONFIG (the error in the message)."""
    with pytest.raises(CniError) as info:
        parse(raw)
    assert info.value.code == INVALID_CONFIG, info.value
    return info.value
