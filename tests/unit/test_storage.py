"""motionnft_core/storage.py: start-up probes of the dirs a run writes (local here; S3 in test_s3.py and below)."""

from __future__ import annotations

import pytest

from motionnft_core import s3
from motionnft_core.storage import check_writable, check_writable_dir


def test_check_writable_dir_creates_the_dir_and_leaves_nothing(tmp_path):
    where = tmp_path / "runs" / "a" / "checkpoints"
    assert check_writable_dir(where) == where.resolve()
    assert where.is_dir() and list(where.iterdir()) == []
    check_writable_dir(str(where))  # an existing dir: fine again


@pytest.mark.parametrize("inside", [False, True])
def test_check_writable_dir_names_the_path_and_the_cause(tmp_path, inside):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    where = blocker / "sub" if inside else blocker
    with pytest.raises(OSError) as err:
        check_writable_dir(where)
    message = str(err.value)
    assert repr(str(where)) in message and "is not writable: cannot create the directory" in message
    assert isinstance(err.value, NotADirectoryError | FileExistsError)


def test_check_writable_dir_refuses_an_empty_path():
    with pytest.raises(ValueError, match="empty path"):
        check_writable_dir("")


def test_check_writable_picks_s3_or_local(s3_bucket, tmp_path):
    check_writable(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt").is_dir()
    check_writable(f"s3://{s3_bucket}/ckpt")
    assert s3.list_prefix(f"s3://{s3_bucket}") == []
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-here/ckpt"):
        check_writable("s3://no-such-bucket-here/ckpt")
