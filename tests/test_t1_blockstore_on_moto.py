"""The block-store tests that rest on conditional writes (leases, fencing, commits, crashes)
again on a second S3 implementation: here the ``s3`` fixture is moto's server, so the same
tests (imported, not copied) that run on SeaweedFS in their own modules run on moto too."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import test_t2_disk, test_t3_commit_faults
from tests.conftest import S3Endpoint
from tests.test_t3_durability import (
    test_kill9_mid_write_reopens_at_a_flushed_state_s3,
    test_two_writers_exactly_one_wins,
)
from tests.test_t3_takeover import test_forced_takeover_under_load_s3

__all__ = [
    "test_forced_takeover_under_load_s3",
    "test_kill9_mid_write_reopens_at_a_flushed_state_s3",
    "test_two_writers_exactly_one_wins",
]


@pytest.fixture
def s3(moto_s3: S3Endpoint) -> S3Endpoint:
    return moto_s3


async def test_random_io_matches_model_across_reopen_on_moto(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    await test_t2_disk.test_random_io_matches_model_across_reopen(
        backend="s3", tmp_path=tmp_path, request=request
    )


LOST_REPLIES = [
    case
    for case in test_t3_commit_faults.CASES
    if case[1] == "after" or case[2] > 0 or case[0] in ("lease create", "head commit")
]
"""Every put of a commit losing its reply after landing, the outages after one, and every
way for the lease create and the head commit (the conditional puts that fence)."""


@pytest.mark.parametrize("target, apply, outage", LOST_REPLIES)
async def test_lost_reply_on_moto(target: str, apply: str, outage: int, s3: S3Endpoint) -> None:
    await test_t3_commit_faults.test_lost_reply_on_s3(
        target=target, apply=apply, outage=outage, s3=s3
    )
