"""Small boto3 helpers for ``s3://`` URIs: data sets, policy and RAFT weights, checkpoints.

Why a module of its own: every component that reads or writes S3 needs the same four things — parse a URI,
build a client from the standard AWS environment, mirror a prefix to a local directory (skipping what is
already there), and turn "no such bucket/key" into a ``FileNotFoundError`` that names the URI.

Why boto3 here rather than fsspec/s3fs: the per-request retries are botocore's own (standard mode), and what
this module adds is what s3fs does not: errors that name the operation, the URI and the variable to set, and a
whole-transfer retry for checkpoint saves. s3fs would also bring aiobotocore, which pins botocore to narrow
ranges of its own, beside boto3's. Ray Data and pyarrow reach S3 through their own filesystems.

The client is plain ``boto3.client("s3")``: credentials, region and endpoint come from the usual AWS
sources (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3`` for MinIO/moto, profiles, instance roles), exactly as boto3 resolves them.

Downloads land in a unique temporary file next to the destination and are renamed into place, so concurrent
workers on one node that fetch the same object never see a half-written file.

Failures: every network call of a public function is wrapped so that missing or rejected credentials,
an unreachable endpoint, access denied, or a transient error that outlived its retries raise ``S3Error``, whose
message names the operation, the ``s3://`` URI and what to set (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``AWS_ENDPOINT_URL``), never a secret; a missing bucket or key stays ``FileNotFoundError``.
Retries come in two layers: botocore retries each HTTP request quickly (standard mode, ``S3_REQUEST_ATTEMPTS``),
and functions given ``retry=S3Retry(...)`` (checkpoint saves: ``checkpoint.s3_retries``/``s3_backoff_s``)
retry a whole object transfer or delete with exponential backoff on transient errors (connection errors, 5xx,
throttling), never on missing buckets, access denied or credentials. ``check_writable`` probes a prefix at
start-up.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from botocore.config import Config as BotoConfig
    from botocore.exceptions import ClientError


logger = logging.getLogger(__name__)
T = TypeVar("T")

S3_SCHEME = "s3://"
# S3 error codes that mean "the bucket or the key does not exist" (HEAD requests only report the bare status).
_NOT_FOUND_CODES = {"404", "NoSuchBucket", "NoSuchKey", "NotFound"}
# Per-request retries inside botocore (standard mode: connection errors, 5xx, throttling, with its own short
# jittered backoff); AWS_MAX_ATTEMPTS / AWS_RETRY_MODE in the environment take precedence.
S3_REQUEST_ATTEMPTS = 5
S3_CONNECT_TIMEOUT_S = 10.0  # botocore's default is 60 s per attempt, too long for a black-holed endpoint
# Error codes that a later attempt may not see (throttling, server-side trouble); any 5xx or 429 counts too.
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "InternalError", "ServiceUnavailable",
    "500", "502", "503", "504",
}  # fmt: skip
# The endpoint rejected who we are (bad/expired key id, wrong secret) or what we may do.
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
    "InvalidClientTokenId", "UnrecognizedClientException",
}  # fmt: skip
_ACCESS_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary credentials), or "
    "AWS_PROFILE naming a profile in the shared credentials file, or run where an instance/pod role provides them"
)
_ENDPOINT_HINT = (
    "set AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) to the S3-compatible endpoint (MinIO, Ceph, ...) or unset it "
    "for AWS, and check that this node can reach it"
)
_CODE_IN_MESSAGE = re.compile(r"An error occurred \((\w+)\)")


@functools.cache
def _b() -> SimpleNamespace:
    """boto3, botocore and s3transfer, imported at the first S3 call: a run without s3:// paths never loads them
    (an offline GPU node may not have them installed)."""
    import boto3
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.config import Config
    from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError, PartialCredentialsError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError

    return SimpleNamespace(
        boto3=boto3, Boto3RetriesExceededError=RetriesExceededError, S3UploadFailedError=S3UploadFailedError,
        BotoConfig=Config, ClientError=ClientError, HTTPClientError=HTTPClientError,
        NoCredentialsError=NoCredentialsError, PartialCredentialsError=PartialCredentialsError,
        BotoConnectionError=BotoConnectionError, TransferRetriesExceededError=TransferRetriesExceededError,
    )  # fmt: skip


def _transient_exceptions() -> tuple[type[BaseException], ...]:
    """Connection refused/reset, timeouts, and s3transfer giving up on a download stream after its own retries."""
    b = _b()
    return (b.BotoConnectionError, b.HTTPClientError, b.Boto3RetriesExceededError, b.TransferRetriesExceededError)


class S3Error(RuntimeError):
    """An S3 call failed in a way retrying here cannot fix (credentials, endpoint, access) or kept failing after
    its retries; the message names the operation, the ``s3://`` URI and what to check, never a secret."""


@dataclass(frozen=True)
class S3Retry:
    """Retries of one whole object transfer/delete/listing on transient errors: ``retries`` after the first
    attempt, waiting ``backoff_s``, then twice that, and so on (jittered by up to -50%, so ranks that hit the same
    throttling spread out). Build it from the config: ``S3Retry.from_config(cfg.checkpoint)``."""

    retries: int
    backoff_s: float

    def __post_init__(self) -> None:
        if self.retries < 0 or not self.backoff_s >= 0:
            raise ValueError(f"S3Retry needs retries >= 0 and backoff_s >= 0, got {self.retries}, {self.backoff_s}")

    @classmethod
    def from_config(cls, checkpoint_cfg) -> S3Retry:
        """From a ``CheckpointConfig`` (``checkpoint.s3_retries``, ``checkpoint.s3_backoff_s``)."""
        return cls(checkpoint_cfg.s3_retries, checkpoint_cfg.s3_backoff_s)

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        return self.backoff_s * (2**retry) * (1.0 - 0.5 * random.random())


def is_s3_uri(s: str | os.PathLike) -> bool:
    """True for strings of the form ``s3://...`` (paths and other schemes are not S3)."""
    return isinstance(s, str) and s.startswith(S3_SCHEME)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; the key may be empty (whole bucket)."""
    if not is_s3_uri(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket name: {uri!r}")
    if len(bucket) < 3 or any(c.isspace() for c in bucket):
        raise ValueError(f"s3 URI has an invalid bucket name {bucket!r}: {uri!r}")
    return bucket, key


def _client_config() -> BotoConfig:
    retries: dict[str, object] = {}
    if "AWS_RETRY_MODE" not in os.environ:
        retries["mode"] = "standard"
    if "AWS_MAX_ATTEMPTS" not in os.environ:
        retries["total_max_attempts"] = S3_REQUEST_ATTEMPTS
    return _b().BotoConfig(retries=retries or None, connect_timeout=S3_CONNECT_TIMEOUT_S)


def s3_client():
    """A boto3 S3 client configured from the standard AWS environment (see the module docstring), with botocore's
    standard retry mode (``S3_REQUEST_ATTEMPTS`` per request) and a ``S3_CONNECT_TIMEOUT_S`` connect timeout."""
    return _b().boto3.client("s3", config=_client_config())


def _client(op: str, uri: str):
    """``s3_client()`` for a public function: a credentials problem found while building it (partial credentials
    in the environment, a broken profile) is translated like the same problem found at the first request."""
    return _call(op, uri, s3_client)


def _endpoint() -> str:
    """The endpoint the client uses, for messages (any user:password in it left out)."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return "AWS's regional endpoint (AWS_ENDPOINT_URL unset)"
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}" if parts.scheme else url


def _client_error(err: BaseException) -> ClientError | None:
    """The _b().ClientError behind ``err`` (itself, or the one boto3 wrapped into an _b().S3UploadFailedError)."""
    if isinstance(err, _b().ClientError):
        return err
    if isinstance(err, _b().S3UploadFailedError):
        inner = err.__cause__ or err.__context__
        return inner if isinstance(inner, _b().ClientError) else None
    return None


def _error_code(err: BaseException) -> str:
    ce = _client_error(err)
    if ce is not None:
        return str(ce.response.get("Error", {}).get("Code", ""))
    match = _CODE_IN_MESSAGE.search(str(err)) if isinstance(err, _b().S3UploadFailedError) else None
    return match.group(1) if match else ""


def is_transient(err: BaseException) -> bool:
    """Worth another attempt: connection/timeout errors, 5xx, 429 and throttling codes. Missing buckets/keys,
    access denied and credential problems are not."""
    if isinstance(err, _transient_exceptions()):
        return True
    if _error_code(err) in _TRANSIENT_CODES:
        return True
    ce = _client_error(err)
    status = ce.response.get("ResponseMetadata", {}).get("HTTPStatusCode") if ce is not None else None
    return isinstance(status, int) and (status >= 500 or status == 429)


def _translate(err: BaseException, op: str, uri: str, attempts: int) -> S3Error | None:
    """The S3Error that explains ``err`` (None: leave it as it is). Only error codes and botocore's own messages
    are quoted, never credentials."""
    where = f"s3 {op} failed for {uri}"
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    if isinstance(err, _b().NoCredentialsError | _b().PartialCredentialsError):
        return S3Error(f"{where}: no usable AWS credentials ({type(err).__name__}: {err}); {_CREDENTIALS_HINT}")
    b = _b()
    if isinstance(err, b.BotoConnectionError | b.HTTPClientError):  # refused/unresolvable, or a timeout/reset mid-way
        what = "cannot reach" if isinstance(err, _b().BotoConnectionError) else "lost the connection to"
        return S3Error(f"{where}{tries}: {what} the S3 endpoint {_endpoint()} ({type(err).__name__}: {err}); "
                       f"{_ENDPOINT_HINT}")  # fmt: skip
    code = _error_code(err)
    if not code and not isinstance(err, _b().Boto3RetriesExceededError | _b().TransferRetriesExceededError):
        return None
    ce = _client_error(err)
    message = str(ce.response.get("Error", {}).get("Message", "")) if ce is not None else ""
    cause = f"{code}: {message}" if message else (code or type(err).__name__)
    if code in _CREDENTIAL_CODES:
        check = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the AWS_PROFILE profile)"
        return S3Error(f"{where}: the endpoint {_endpoint()} rejected the AWS credentials ({cause}); {check}: "
                       f"{_CREDENTIALS_HINT}")  # fmt: skip
    if code in _ACCESS_CODES:
        bucket = uri[len(S3_SCHEME) :].partition("/")[0]
        return S3Error(f"{where}: access denied ({cause}); the credentials from AWS_ACCESS_KEY_ID/"
                       f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) must be valid for {_endpoint()} and allowed to "
                       f"{op} in bucket {bucket!r}")  # fmt: skip
    if is_transient(err):
        hint = "the store is throttling or flaky; for checkpoint saves raise checkpoint.s3_retries / s3_backoff_s"
        return S3Error(f"{where}{tries}: a transient S3 error that did not clear ({cause}); {hint}")
    return None


def _call(op: str, uri: str, fn: Callable[[], T], retry: S3Retry | None = None) -> T:
    """``fn()`` retried on transient errors per ``retry`` (None: once), its failure translated (``_translate``).
    FileNotFoundError, ValueError and errors already translated pass through untouched."""
    attempts = 1 + (retry.retries if retry is not None else 0)
    for attempt in range(attempts):
        try:
            return fn()
        except (S3Error, FileNotFoundError, ValueError):
            raise
        except Exception as err:
            if attempt + 1 < attempts and is_transient(err):
                wait = retry.delay(attempt)
                logger.warning("s3 %s of %s failed (%s: %s); retry %d/%d in %.1f s", op, uri, type(err).__name__,
                               err, attempt + 1, attempts - 1, wait)  # fmt: skip
                time.sleep(wait)
                continue
            translated = _translate(err, op, uri, attempt + 1)
            if translated is None:
                raise
            raise translated from err
    raise AssertionError("unreachable")


def _is_not_found(err: BaseException | None) -> bool:
    return isinstance(err, _b().ClientError) and str(err.response.get("Error", {}).get("Code")) in _NOT_FOUND_CODES


def _dir_prefix(key: str) -> str:
    """Treat a key as a directory: ``a/b`` -> ``a/b/`` so that ``a/b2/x`` is not part of it."""
    return key if key == "" or key.endswith("/") else key + "/"


def _list_objects(client, bucket: str, prefix: str, uri: str) -> list[tuple[str, int]]:
    """All (key, size) under ``prefix``, following pagination; a missing bucket is FileNotFoundError."""
    out = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend((obj["Key"], int(obj["Size"])) for obj in page.get("Contents", []))
    except _b().ClientError as err:
        if _is_not_found(err):
            raise FileNotFoundError(f"s3 bucket not found for {uri} ({bucket!r})") from err
        raise
    return out


def list_prefix(uri: str, *, retry: S3Retry | None = None) -> list[str]:
    """Sorted ``s3://`` URIs of every object under ``uri`` taken as a directory (recursive).

    An existing but empty prefix gives ``[]`` (e.g. "no checkpoints yet"); a missing bucket raises.
    """
    bucket, key = split_s3_uri(uri)
    client = _client("list", uri)
    objects = _call("list", uri, functools.partial(_list_objects, client, bucket, _dir_prefix(key), uri), retry)
    return sorted(f"{S3_SCHEME}{bucket}/{k}" for k, _ in objects)


def _fetch(client, bucket: str, key: str, dest: Path, uri: str) -> None:
    """Download one object through a unique temporary file, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        client.download_file(bucket, key, str(tmp))
        os.replace(tmp, dest)
    except _b().ClientError as err:
        if _is_not_found(err):
            raise FileNotFoundError(f"s3 object not found: {uri} (missing bucket or key)") from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def download_file(uri: str, dest: str | os.PathLike, *, retry: S3Retry | None = None) -> Path:
    """Download the object at ``uri`` to the file ``dest``; skipped when ``dest`` already has its size.

    The size check is the cache rule for the whole module: an object rewritten in place with the same size
    is not re-fetched, so use a fresh destination for mutable objects.
    """
    bucket, key = split_s3_uri(uri)
    if not key or key.endswith("/"):
        raise ValueError(f"s3 URI names a prefix, not an object: {uri!r}")
    dest = Path(dest)
    client = _client("download", uri)

    def head_and_fetch() -> Path:
        try:
            size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except _b().ClientError as err:
            if _is_not_found(err):
                raise FileNotFoundError(f"s3 object not found: {uri} (missing bucket or key)") from err
            raise
        if not (dest.is_file() and dest.stat().st_size == size):
            _fetch(client, bucket, key, dest, uri)
        return dest

    return _call("download", uri, head_and_fetch, retry)


def download_prefix(uri: str, dest_dir: str | os.PathLike, *, retry: S3Retry | None = None) -> Path:
    """Mirror every object under ``uri`` (a directory-like prefix) into ``dest_dir``, keeping relative paths.

    Files already present with the object's size are skipped, so a second call is a cheap no-op. A prefix
    with no objects raises FileNotFoundError (nothing to download is always a mistake for a caller here).
    """
    bucket, key = split_s3_uri(uri)
    prefix = _dir_prefix(key)
    dest_dir = Path(dest_dir)
    client = _client("download", uri)
    objects = _call("list", uri, functools.partial(_list_objects, client, bucket, prefix, uri), retry)
    if not objects:
        raise FileNotFoundError(f"no s3 objects under {uri}")
    for obj_key, size in objects:
        rel = PurePosixPath(obj_key[len(prefix) :])
        if obj_key.endswith("/") or not rel.parts:
            continue  # "directory marker" objects written by some tools
        if ".." in rel.parts:
            raise ValueError(f"s3 key {obj_key!r} under {uri} escapes the destination directory")
        local = dest_dir.joinpath(*rel.parts)
        if local.is_file() and local.stat().st_size == size:
            continue
        obj_uri = f"{S3_SCHEME}{bucket}/{obj_key}"
        _call("download", obj_uri, functools.partial(_fetch, client, bucket, obj_key, local, obj_uri), retry)
    return dest_dir


def _upload(client, src: Path, bucket: str, key: str, uri: str) -> None:
    try:
        client.upload_file(str(src), bucket, key)
    except _b().S3UploadFailedError as err:
        # boto3 wraps the _b().ClientError; a missing bucket is the one failure callers can act on.
        if _is_not_found(err.__cause__ or err.__context__) or "NoSuchBucket" in str(err):
            raise FileNotFoundError(f"s3 bucket not found for {uri} ({bucket!r})") from err
        raise


def upload_file(src: str | os.PathLike, uri: str, *, retry: S3Retry | None = None) -> None:
    """Upload the local file ``src`` to the object ``uri`` (multipart for large files, as boto3 does)."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"upload source is not a file: {src}")
    bucket, key = split_s3_uri(uri)
    if not key or key.endswith("/"):
        raise ValueError(f"s3 URI names a prefix, not an object: {uri!r}")
    _call("upload", uri, functools.partial(_upload, _client("upload", uri), src, bucket, key, uri), retry)


def _delete_batch(client, bucket: str, keys: list[str], uri: str) -> None:
    """One DeleteObjects call; per-key failures (reported in the answer, not raised by boto3) become the
    _b().ClientError of the first one, so that they are retried or translated like any other."""
    try:
        answer = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True})
    except _b().ClientError as err:
        if _is_not_found(err):
            raise FileNotFoundError(f"s3 bucket not found for {uri} ({bucket!r})") from err
        raise
    if errors := answer.get("Errors"):
        first = errors[0]
        raise _b().ClientError(
            {"Error": {"Code": first.get("Code", ""), "Message": f"{first.get('Message', '')} "
                       f"(key {first.get('Key')!r}; {len(errors)} of {len(keys)} keys failed)"}},
            "DeleteObjects",
        )  # fmt: skip


def delete_prefix(uri: str, *, retry: S3Retry | None = None) -> int:
    """Delete every object under ``uri`` taken as a directory (checkpoint retention); returns how many."""
    bucket, key = split_s3_uri(uri)
    client = _client("delete", uri)
    objects = _call("list", uri, functools.partial(_list_objects, client, bucket, _dir_prefix(key), uri), retry)
    for start in range(0, len(objects), 1000):  # the API's batch limit
        chunk = [k for k, _ in objects[start : start + 1000]]
        _call("delete", uri, functools.partial(_delete_batch, client, bucket, chunk, uri), retry)
    return len(objects)


def delete_object(uri: str, *, retry: S3Retry | None = None) -> None:
    """Delete the object ``uri``; an object that is not there is fine (S3 deletes are idempotent), a missing
    bucket is FileNotFoundError."""
    bucket, key = split_s3_uri(uri)
    if not key or key.endswith("/"):
        raise ValueError(f"s3 URI names a prefix, not an object: {uri!r}")
    client = _client("delete", uri)

    def delete() -> None:
        try:
            client.delete_object(Bucket=bucket, Key=key)
        except _b().ClientError as err:
            if _is_not_found(err):
                raise FileNotFoundError(f"s3 bucket not found for {uri} ({bucket!r})") from err
            raise

    _call("delete", uri, delete, retry)


def check_writable(uri: str, probe_name: str) -> None:
    """Start-up probe of an ``s3://`` prefix a run will write (``checkpoint.dir``): puts a small object
    ``<uri>/<probe_name>``, lists it and deletes it, so that credentials, the endpoint, the bucket and
    the permissions a checkpoint needs (put, list, delete) are all exercised now, not at the first save.

    Raises FileNotFoundError for a missing bucket and S3Error otherwise (no or rejected credentials, endpoint
    unreachable, access denied), each naming ``uri``; botocore's own quick per-request retries apply.
    """
    bucket, key = split_s3_uri(uri)
    probe = f"{_dir_prefix(key)}{probe_name}"
    probe_uri = f"{S3_SCHEME}{bucket}/{probe}"
    client = _client("write", uri)

    def found(request: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            try:
                return request()
            except _b().ClientError as err:
                if _is_not_found(err):
                    raise FileNotFoundError(f"s3 bucket not found for {uri} ({bucket!r}): create it or fix the "
                                            "bucket name") from err  # fmt: skip
                raise

        return run

    _call("write", uri, found(lambda: client.put_object(Bucket=bucket, Key=probe, Body=b"motionnft probe\n")))
    try:
        _call("list", uri, found(lambda: client.list_objects_v2(Bucket=bucket, Prefix=probe, MaxKeys=1)))
        _call("delete", uri, found(lambda: client.delete_object(Bucket=bucket, Key=probe)))
    except S3Error as err:
        raise S3Error(f"{err} (writing worked; the probe object {probe_uri} may be left behind; checkpoints need "
                      "the list and delete permissions too)") from err.__cause__  # fmt: skip
