import pytest

from fleet.errors import InvalidCampaignIdError
from fleet.ids import validate_campaign_id


@pytest.mark.parametrize("good", ["a", "campaign-00001", "User_42.x-y", "9" * 128])
def test_valid_ids_pass(good):
    assert validate_campaign_id(good) == good


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-lead", ".hidden", "x" * 129, "x" * 200, "a b", "é", None, 5])
def test_invalid_ids_are_rejected_with_reason(bad):
    with pytest.raises(InvalidCampaignIdError, match="invalid campaign id"):
        validate_campaign_id(bad, path="s3://bucket/teachers")
