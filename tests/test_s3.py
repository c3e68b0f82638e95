"""common/s3.py against a real moto S3 server process (the s3_server / s3_bucket fixtures)."""

from __future__ import annotations

import os
import re

import pytest

from common import s3


@pytest.mark.parametrize(
    ("uri", "expected"),
    [("s3://bkt/a/b.bin", ("bkt", "a/b.bin")), ("s3://bkt", ("bkt", "")), ("s3://bkt/dir/", ("bkt", "dir/"))],
)
def test_split_s3_uri(uri, expected):
    assert s3.is_s3_uri(uri)
    assert s3.split_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["/local/path", "s3:/bkt/x", "s3:///key", "s3://ab/key"])
def test_split_s3_uri_rejects_malformed(uri):
    with pytest.raises(ValueError, match=re.escape(repr(uri))):
        s3.split_s3_uri(uri)


def _tree(root):
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(200)))
    (root / "sub" / "deeper" / "c.txt").write_bytes(b"")
    return {"a.txt": b"alpha", "sub/b.bin": bytes(range(200)), "sub/deeper/c.txt": b""}


def test_upload_list_download_round_trip(s3_bucket, tmp_path):
    files = _tree(tmp_path / "src")
    s3.upload_dir(tmp_path / "src", f"s3://{s3_bucket}/run/ckpt")
    s3.upload_file(tmp_path / "src" / "a.txt", f"s3://{s3_bucket}/run/ckpt2/a.txt")  # sibling, not inside
    assert s3.list_prefix(f"s3://{s3_bucket}/run/ckpt") == [f"s3://{s3_bucket}/run/ckpt/{rel}" for rel in sorted(files)]
    assert s3.list_prefix(f"s3://{s3_bucket}/run/none") == []

    dest = s3.download_prefix(f"s3://{s3_bucket}/run/ckpt/", tmp_path / "dest")
    assert dest == tmp_path / "dest"
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == files

    one = s3.download_file(f"s3://{s3_bucket}/run/ckpt/sub/b.bin", tmp_path / "one" / "b.bin")
    assert one.read_bytes() == files["sub/b.bin"]


def test_download_prefix_skips_complete_files_and_refetches_wrong_sizes(s3_bucket, tmp_path):
    _tree(tmp_path / "src")
    uri = f"s3://{s3_bucket}/data"
    s3.upload_dir(tmp_path / "src", uri)
    dest = s3.download_prefix(uri, tmp_path / "dest")
    a, b = dest / "a.txt", dest / "sub" / "b.bin"
    old = 1_000_000_000  # a recognisable mtime (ns) that a re-download would replace
    os.utime(a, ns=(old, old))
    b.write_bytes(b"short")  # wrong size: must be fetched again
    s3.download_prefix(uri, dest)
    assert a.stat().st_mtime_ns == old
    assert b.read_bytes() == bytes(range(200))
    assert not list(dest.rglob("*.part"))


def test_missing_bucket_or_key_is_file_not_found_naming_the_uri(s3_bucket, tmp_path):
    (tmp_path / "f.txt").write_text("x")
    for call, uri in [
        (lambda u: s3.download_file(u, tmp_path / "x"), f"s3://{s3_bucket}/nope.bin"),
        (lambda u: s3.download_file(u, tmp_path / "x"), "s3://no-such-bucket-here/k"),
        (lambda u: s3.download_prefix(u, tmp_path / "d"), f"s3://{s3_bucket}/empty/"),
        (lambda u: s3.download_prefix(u, tmp_path / "d"), "s3://no-such-bucket-here/p"),
        (s3.list_prefix, "s3://no-such-bucket-here/p"),
        (lambda u: s3.upload_file(tmp_path / "f.txt", u), "s3://no-such-bucket-here/f.txt"),
    ]:
        with pytest.raises(FileNotFoundError) as err:
            call(uri)
        assert uri in str(err.value)
    assert not (tmp_path / "x").exists()


def test_policy_loads_from_s3(s3_bucket, tiny_pipelines, tmp_path):
    """A pipeline uploaded to S3 loads through the same from_pretrained path as a local one."""
    import torch

    from common import s3
    from models.policy import EditPolicy

    uri = f"s3://{s3_bucket}/models/tiny-kontext"
    s3.upload_dir(tiny_pipelines["flux_kontext"], uri)
    remote = EditPolicy.from_pretrained(uri, family="flux_kontext", cache_dir=tmp_path)
    local = EditPolicy.from_pretrained(str(tiny_pipelines["flux_kontext"]), family="flux_kontext")
    assert (tmp_path / s3_bucket / "models" / "tiny-kontext" / "model_index.json").is_file()
    for (name, a), (_, b) in zip(remote.transformer.state_dict().items(), local.transformer.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert torch.equal(a, b), name
