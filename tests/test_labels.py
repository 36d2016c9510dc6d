"""Label filters (`dtclient ls env=prod role=db`): all must match; malformed ones refused."""

from __future__ import annotations

import pytest

from bastion.protocol.errors import UsageError
from bastion.protocol.labels import matches, parse_filters

NODE = {"name": "db-1", "labels": {"env": "prod", "role": "db"}}


def test_all_filters_must_match():
    assert matches(NODE, parse_filters([]))
    assert matches(NODE, parse_filters(["env=prod"]))
    assert matches(NODE, parse_filters(["env=prod", "role=db", "env=prod"]))
    assert not matches(NODE, parse_filters(["env=prod", "role=web"]))
    assert not matches(NODE, parse_filters(["team=x"]))
    assert not matches({"name": "bare"}, parse_filters(["env=prod"]))
    assert matches({"labels": {"url": "a=b"}}, parse_filters(["url=a=b"]))


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["prod"], "is not KEY=VALUE"),
        (["=prod"], "is not KEY=VALUE"),
        (["env=prod", "env=dev"], "filtered twice"),
    ],
)
def test_refused(words: list[str], message: str):
    with pytest.raises(UsageError, match=message):
        parse_filters(words)
