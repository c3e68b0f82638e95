"""motionnft_core/s3.py against a real moto S3 server process (the s3_server / s3_bucket fixtures)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from motionnft_core import s3, storage
from tests.storage_helpers import upload_dir


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
    upload_dir(tmp_path / "src", f"s3://{s3_bucket}/run/ckpt")
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
    upload_dir(tmp_path / "src", uri)
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

    from motionnft_core.models.policy import EditPolicy

    uri = f"s3://{s3_bucket}/models/tiny-kontext"
    upload_dir(tiny_pipelines["flux_kontext"], uri)
    remote = EditPolicy.from_pretrained(uri, family="flux_kontext", cache_dir=tmp_path)
    local = EditPolicy.from_pretrained(str(tiny_pipelines["flux_kontext"]), family="flux_kontext")
    assert (tmp_path / s3_bucket / "models" / "tiny-kontext" / "model_index.json").is_file()
    for (name, a), (_, b) in zip(remote.transformer.state_dict().items(), local.transformer.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------ failures

SECRET = "wJalrXUtnFEMI-do-not-print-me"  # a recognisable secret that no message may contain
TRANSIENT = {"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
             "ResponseMetadata": {"HTTPStatusCode": 503}}  # fmt: skip


@pytest.fixture
def fresh_session(monkeypatch):
    """A new default boto3 session for the test: botocore caches resolved credentials per session, so
    environment changes made by the test would otherwise go unseen."""
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


@pytest.fixture
def no_credentials(s3_server, fresh_session, monkeypatch, tmp_path):
    """Only AWS_SECRET_ACCESS_KEY set (no key id, no shared files): boto3 finds no credentials."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))


def _calls(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "g.txt").write_text("y")
    return [
        ("upload", lambda u: s3.upload_file(tmp_path / "f.txt", u)),
        ("download", lambda u: s3.download_file(u, tmp_path / "out")),
        ("list", lambda u: s3.download_prefix(u, tmp_path / "out-dir")),
        ("list", s3.list_prefix),
        ("list", s3.delete_prefix),
        ("delete", s3.delete_object),
        ("write", storage.check_writable),
    ]


def test_no_credentials_names_the_uri_and_what_to_set_never_the_secret(s3_bucket, no_credentials, tmp_path):
    for op, call in _calls(tmp_path):
        uri = f"s3://{s3_bucket}/run/obj.bin"
        with pytest.raises(s3.S3Error) as err:
            call(uri)
        message = str(err.value)
        assert f"s3 {op} failed for s3://{s3_bucket}/run/" in message, message
        assert "no usable AWS credentials" in message and "NoCredentialsError" in message
        for hint in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
            assert hint in message
        assert SECRET not in message and SECRET not in repr(err.value)


def test_partial_credentials_name_the_missing_variable(s3_bucket, fresh_session, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(s3.S3Error, match="PartialCredentialsError.*AWS_SECRET_ACCESS_KEY") as err:
        s3.list_prefix(f"s3://{s3_bucket}/x")
    assert f"s3://{s3_bucket}/x" in str(err.value)


def test_check_writable_leaves_no_object(s3_bucket):
    import boto3

    storage.check_writable(f"s3://{s3_bucket}/runs/a/checkpoints")
    storage.check_writable(f"s3://{s3_bucket}/runs/b/")
    storage.check_writable(f"s3://{s3_bucket}")  # the bucket root
    assert boto3.client("s3").list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


def test_check_writable_missing_bucket(s3_server):
    with pytest.raises(FileNotFoundError, match=re.escape("s3 bucket not found for s3://no-such-bucket-here/ckpt")):
        storage.check_writable("s3://no-such-bucket-here/ckpt")


def test_unreachable_endpoint_fails_fast_naming_the_uri_and_endpoint(s3_server, fresh_session, monkeypatch, tmp_path):
    import time

    from motionnft_core.net import free_port

    endpoint = f"http://127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    start = time.monotonic()
    with pytest.raises(s3.S3Error) as err:
        storage.check_writable("s3://some-bucket/ckpt")
    assert time.monotonic() - start < 10  # botocore's retries of a refused connection back off in milliseconds
    message = str(err.value)
    assert message.startswith("s3 write failed for s3://some-bucket/ckpt: ")
    assert f"cannot reach the S3 endpoint {endpoint}" in message and "AWS_ENDPOINT_URL" in message
    assert SECRET not in message

    (tmp_path / "f").write_text("x")
    with pytest.raises(s3.S3Error, match="s3 upload failed for s3://some-bucket/f after 3 attempts: cannot reach"):
        s3.upload_file(tmp_path / "f", "s3://some-bucket/f", retry=s3.S3Retry(2, 0.01))


def _flaky(monkeypatch, method: str, failures: list[BaseException]) -> list[int]:
    """Make `method` of the S3 clients the module builds raise `failures` in turn, then work; returns the list
    of calls (one entry per call)."""
    client = s3.s3_client()
    real = getattr(client, method)
    calls: list[int] = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return real(*args, **kwargs)

    setattr(client, method, flaky)
    monkeypatch.setattr(s3, "s3_client", lambda: client)
    return calls


def _upload_failed(response: dict) -> Exception:
    """What boto3's upload_file raises for a ClientError: an S3UploadFailedError with the ClientError as context."""
    try:
        raise ClientError(response, "PutObject")
    except ClientError as e:
        try:
            raise S3UploadFailedError(f"Failed to upload f to b/k: {e}")  # noqa: B904 - as boto3 raises it
        except S3UploadFailedError as wrapped:
            return wrapped


def test_transient_upload_errors_are_retried(s3_bucket, monkeypatch, tmp_path, caplog):
    calls = _flaky(monkeypatch, "upload_file",
                   [_upload_failed(TRANSIENT), EndpointConnectionError(endpoint_url="http://x")])  # fmt: skip
    (tmp_path / "f.bin").write_bytes(b"payload")
    uri = f"s3://{s3_bucket}/ckpt/f.bin"
    with caplog.at_level("WARNING", logger="motionnft_core.s3"):
        s3.upload_file(tmp_path / "f.bin", uri, retry=s3.S3Retry(retries=3, backoff_s=0.01))
    assert len(calls) == 3  # two failures, then the real upload
    assert s3.list_prefix(f"s3://{s3_bucket}/ckpt") == [uri]
    assert "retry 1/3" in caplog.text and "retry 2/3" in caplog.text and "SlowDown" in caplog.text


def test_retries_are_bounded(s3_bucket, monkeypatch, tmp_path):
    calls = _flaky(monkeypatch, "upload_file", [_upload_failed(TRANSIENT)] * 10)
    (tmp_path / "f.bin").write_bytes(b"payload")
    uri = f"s3://{s3_bucket}/f.bin"
    with pytest.raises(s3.S3Error, match=re.escape(f"s3 upload failed for {uri} after 3 attempts")) as err:
        s3.upload_file(tmp_path / "f.bin", uri, retry=s3.S3Retry(2, 0.0))
    assert len(calls) == 3 and "SlowDown" in str(err.value) and "checkpoint.s3_retries" in str(err.value)

    calls.clear()  # without a retry policy: one attempt here (botocore's own per-request retries aside)
    with pytest.raises(s3.S3Error, match=re.escape(f"s3 upload failed for {uri}: a transient")):
        s3.upload_file(tmp_path / "f.bin", uri)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("code", "match"),
    [("AccessDenied", "access denied \\(AccessDenied"), ("InvalidAccessKeyId", "rejected the AWS credentials")],
)
def test_access_errors_are_not_retried(s3_bucket, monkeypatch, tmp_path, code, match):
    calls = _flaky(monkeypatch, "upload_file", [_upload_failed({"Error": {"Code": code, "Message": "no"}})] * 10)
    (tmp_path / "f.bin").write_bytes(b"payload")
    uri = f"s3://{s3_bucket}/f.bin"
    with pytest.raises(s3.S3Error, match=match) as err:
        s3.upload_file(tmp_path / "f.bin", uri, retry=s3.S3Retry(3, 0.0))
    assert len(calls) == 1
    assert uri in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value)


def test_missing_bucket_is_not_retried(s3_server, monkeypatch, tmp_path):
    calls = _flaky(monkeypatch, "upload_file", [])
    (tmp_path / "f.bin").write_bytes(b"payload")
    with pytest.raises(FileNotFoundError, match="no-such-bucket-here"):
        s3.upload_file(tmp_path / "f.bin", "s3://no-such-bucket-here/f.bin", retry=s3.S3Retry(3, 0.0))
    assert len(calls) == 1


def test_transient_download_and_delete_errors_are_retried(s3_bucket, monkeypatch, tmp_path):
    _tree(tmp_path / "src")
    uri = f"s3://{s3_bucket}/ckpt"
    upload_dir(tmp_path / "src", uri)
    retry = s3.S3Retry(2, 0.0)

    calls = _flaky(monkeypatch, "download_file", [ReadTimeoutError(endpoint_url="http://x")])
    assert s3.download_file(f"{uri}/a.txt", tmp_path / "a.txt", retry=retry).read_bytes() == b"alpha"
    assert len(calls) == 2 and not list(tmp_path.glob("*.part"))

    # DeleteObjects reports per-key failures in its answer rather than raising: those are retried too.
    monkeypatch.undo()
    client = s3.s3_client()
    real = client.delete_objects
    answers = []

    def partly_failing(**kwargs):
        answers.append(1)
        if len(answers) == 1:
            key = kwargs["Delete"]["Objects"][0]["Key"]
            return {"Errors": [{"Key": key, "Code": "InternalError", "Message": "We encountered an internal error"}]}
        return real(**kwargs)

    client.delete_objects = partly_failing
    monkeypatch.setattr(s3, "s3_client", lambda: client)
    assert s3.delete_prefix(uri, retry=retry) == 3
    assert len(answers) == 2 and s3.list_prefix(uri) == []

    answers.clear()
    client.delete_objects = lambda **kw: {"Errors": [{"Key": "k", "Code": "AccessDenied", "Message": "no"}]}
    s3.upload_file(tmp_path / "a.txt", f"{uri}/a.txt")
    with pytest.raises(s3.S3Error, match="access denied \\(AccessDenied: no \\(key 'k'; 1 of 1 keys failed\\)"):
        s3.delete_prefix(uri, retry=retry)


def test_check_writable_names_a_missing_delete_permission(s3_bucket, monkeypatch):
    _flaky(monkeypatch, "delete_object", [ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}},
                                                      "DeleteObject")])  # fmt: skip
    with pytest.raises(s3.S3Error, match="s3 delete failed for .*access denied.*may be left behind"):
        storage.check_writable(f"s3://{s3_bucket}/ckpt")


@pytest.mark.parametrize(
    ("make", "transient"),
    [
        (lambda: EndpointConnectionError(endpoint_url="u"), True),
        (lambda: ConnectTimeoutError(endpoint_url="u"), True),
        (lambda: ReadTimeoutError(endpoint_url="u"), True),
        (NoCredentialsError, False),
        (lambda: _client_error("SlowDown", 503), True),
        (lambda: _client_error("InternalError", 500), True),
        (lambda: _client_error("RequestTimeout", 400), True),
        (lambda: _client_error("Whatever", 502), True),
        (lambda: _client_error("AccessDenied", 403), False),
        (lambda: _client_error("NoSuchBucket", 404), False),
        (lambda: _upload_failed(TRANSIENT), True),
        (lambda: OSError("disk full"), False),
    ],
)
def test_is_transient(make, transient):
    assert s3.is_transient(make()) is transient


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


def test_the_training_path_runs_without_boto3_until_an_s3_call():
    """A run without s3:// paths needs no boto3 / botocore (an offline GPU node may lack them): with them made
    unimportable, the module and the training driver import (tensorboard tries boto3 optionally), and only the
    first S3 call needs them."""
    code = """
import sys
sys.modules.update(boto3=None, botocore=None, s3transfer=None)  # as if not installed: imports of them fail
import learner.driver.loop, motionnft_core.s3 as s3
assert s3.split_s3_uri("s3://bucket/key") == ("bucket", "key")
try:
    s3.s3_client()
except ModuleNotFoundError as e:
    print("needs", e.name)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "needs boto3"
