import random

import pytest

from fleet.core.errors import InvalidCampaignIdError
from fleet.core.ids import encode_campaign_ids, validate_campaign_id


@pytest.mark.parametrize("good", ["a", "campaign-00001", "User_42.x-y", "9" * 128])
def test_valid_ids_pass(good):
    assert validate_campaign_id(good) == good


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-lead", ".hidden", "x" * 129, "x" * 200, "a b", "é", None, 5])
def test_invalid_ids_are_rejected_with_reason(bad):
    with pytest.raises(InvalidCampaignIdError, match="invalid campaign id"):
        validate_campaign_id(bad, path="s3://bucket/teachers")


GOOD = ["a", "campaign-00001", "User_42.x-y", "9" * 128, "Z", "0.0", "a_"]
BAD = [
    "",
    "../x",
    "a/b",
    "-lead",
    ".hidden",
    "_x",
    "x" * 129,
    "a b",
    "é",
    "a\n",
    "a\x00",
    "\x00a",
    "a\tb",
    None,
    5,
    b"campaign",
    1.5,
]


def test_encode_campaign_ids_agrees_with_the_pattern():
    """The vectorised check (fleet.core.ids.encode_campaign_ids) accepts a list exactly when every entry passes
    validate_campaign_id, and encodes it as the fixed-width bytes HeadTable.find searches."""
    encoded = encode_campaign_ids(GOOD)
    assert encoded is not None and [e.decode("ascii") for e in encoded.tolist()] == GOOD
    assert encode_campaign_ids([]) is not None and len(encode_campaign_ids([])) == 0
    for bad in BAD:
        with pytest.raises(InvalidCampaignIdError):
            validate_campaign_id(bad)
        assert encode_campaign_ids([*GOOD, bad]) is None, bad
        assert encode_campaign_ids([bad]) is None, bad
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(130)]
    for _ in range(2000):  # random short ids: the two checks agree on each
        cid = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
        try:
            validate_campaign_id(cid)
            valid = True
        except InvalidCampaignIdError:
            valid = False
        assert (encode_campaign_ids([cid]) is not None) == valid, repr(cid)
