"""Small boto3 helpers for ``s3://`` URIs: data sets, policy and RAFT weights, checkpoints.

Why a module of its own: every component that reads or writes S3 needs the same four things — parse a URI,
build a client from the standard AWS environment, mirror a prefix to a local directory (skipping what is
already there), and turn "no such bucket/key" into a ``FileNotFoundError`` that names the URI.

The client is plain ``boto3.client("s3")``: credentials, region and endpoint come from the usual AWS
sources (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3`` for MinIO/moto, profiles, instance roles), exactly as boto3 resolves them.

Downloads land in a unique temporary file next to the destination and are renamed into place, so concurrent
workers on one node that fetch the same object never see a half-written file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Collection
from pathlib import Path, PurePosixPath

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError

S3_SCHEME = "s3://"
# S3 error codes that mean "the bucket or the key does not exist" (HEAD requests only report the bare status).
_NOT_FOUND_CODES = {"404", "NoSuchBucket", "NoSuchKey", "NotFound"}


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


def s3_client():
    """A boto3 S3 client configured from the standard AWS environment (see the module docstring)."""
    return boto3.client("s3")


def _is_not_found(err: BaseException | None) -> bool:
    return isinstance(err, ClientError) and str(err.response.get("Error", {}).get("Code")) in _NOT_FOUND_CODES


def _dir_prefix(key: str) -> str:
    """Treat a key as a directory: ``a/b`` -> ``a/b/`` so that ``a/b2/x`` is not part of it."""
    return key if key == "" or key.endswith("/") else key + "/"


def _list_objects(client, bucket: str, prefix: str, uri: str) -> list[tuple[str, int]]:
    """All (key, size) under ``prefix``, following pagination; a missing bucket is FileNotFoundError."""
    out = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend((obj["Key"], int(obj["Size"])) for obj in page.get("Contents", []))
    except ClientError as err:
        if _is_not_found(err):
            raise FileNotFoundError(f"s3 bucket not found for {uri} ({bucket!r})") from err
        raise
    return out


def list_prefix(uri: str) -> list[str]:
    """Sorted ``s3://`` URIs of every object under ``uri`` taken as a directory (recursive).

    An existing but empty prefix gives ``[]`` (e.g. "no checkpoints yet"); a missing bucket raises.
    """
    bucket, key = split_s3_uri(uri)
    objects = _list_objects(s3_client(), bucket, _dir_prefix(key), uri)
    return sorted(f"{S3_SCHEME}{bucket}/{k}" for k, _ in objects)


def _fetch(client, bucket: str, key: str, dest: Path, uri: str) -> None:
    """Download one object through a unique temporary file, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        client.download_file(bucket, key, str(tmp))
        os.replace(tmp, dest)
    except ClientError as err:
        if _is_not_found(err):
            raise FileNotFoundError(f"s3 object not found: {uri} (missing bucket or key)") from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def download_file(uri: str, dest: str | os.PathLike) -> Path:
    """Download the object at ``uri`` to the file ``dest``; skipped when ``dest`` already has its size.

    The size check is the cache rule for the whole module: an object rewritten in place with the same size
    is not re-fetched, so use a fresh destination for mutable objects.
    """
    bucket, key = split_s3_uri(uri)
    if not key or key.endswith("/"):
        raise ValueError(f"s3 URI names a prefix, not an object: {uri!r}")
    dest = Path(dest)
    client = s3_client()
    try:
        size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError as err:
        if _is_not_found(err):
            raise FileNotFoundError(f"s3 object not found: {uri} (missing bucket or key)") from err
        raise
    if not (dest.is_file() and dest.stat().st_size == size):
        _fetch(client, bucket, key, dest, uri)
    return dest


def download_prefix(uri: str, dest_dir: str | os.PathLike) -> Path:
    """Mirror every object under ``uri`` (a directory-like prefix) into ``dest_dir``, keeping relative paths.

    Files already present with the object's size are skipped, so a second call is a cheap no-op. A prefix
    with no objects raises FileNotFoundError (nothing to download is always a mistake for a caller here).
    """
    bucket, key = split_s3_uri(uri)
    prefix = _dir_prefix(key)
    dest_dir = Path(dest_dir)
    client = s3_client()
    objects = _list_objects(client, bucket, prefix, uri)
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
        _fetch(client, bucket, obj_key, local, f"{S3_SCHEME}{bucket}/{obj_key}")
    return dest_dir


def _upload(client, src: Path, bucket: str, key: str, uri: str) -> None:
    try:
        client.upload_file(str(src), bucket, key)
    except S3UploadFailedError as err:
        # boto3 wraps the ClientError; a missing bucket is the one failure callers can act on.
        if _is_not_found(err.__cause__ or err.__context__) or "NoSuchBucket" in str(err):
            raise FileNotFoundError(f"s3 bucket not found for {uri} ({bucket!r})") from err
        raise


def upload_file(src: str | os.PathLike, uri: str) -> None:
    """Upload the local file ``src`` to the object ``uri`` (multipart for large files, as boto3 does)."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"upload source is not a file: {src}")
    bucket, key = split_s3_uri(uri)
    if not key or key.endswith("/"):
        raise ValueError(f"s3 URI names a prefix, not an object: {uri!r}")
    _upload(s3_client(), src, bucket, key, uri)


def upload_dir(src_dir: str | os.PathLike, uri: str, *, skip: Collection[str] = ()) -> None:
    """Upload every file under ``src_dir`` to ``uri`` taken as a directory, keeping relative paths, in sorted
    order; files whose relative path is in ``skip`` are left out (a commit marker the caller uploads last)."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"upload source is not a directory: {src_dir}")
    bucket, key = split_s3_uri(uri)
    prefix = _dir_prefix(key)
    client = s3_client()
    for path in sorted(p for p in src_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(src_dir).as_posix()
        if rel in skip:
            continue
        _upload(client, path, bucket, prefix + rel, f"{S3_SCHEME}{bucket}/{prefix + rel}")


def delete_prefix(uri: str) -> int:
    """Delete every object under ``uri`` taken as a directory (checkpoint retention); returns how many."""
    bucket, key = split_s3_uri(uri)
    client = s3_client()
    objects = _list_objects(client, bucket, _dir_prefix(key), uri)
    for start in range(0, len(objects), 1000):  # the API's batch limit
        chunk = [{"Key": k} for k, _ in objects[start : start + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
    return len(objects)
