"""Extracting tar / zip archives (data sets, shards) without trusting their member names.

An archive from elsewhere can name a member ``../../.bashrc`` or ``/etc/cron.d/x``, hold a
symlink to ``/`` followed by a file "inside" it, a hard link to a file outside, or a device
node. :func:`safe_extract` refuses all of these *before writing anything* and raises
:class:`UnsafeArchiveError` naming the member; :func:`safe_member_name` is the same check
for code that reads members without extracting them (e.g. a shard reader keying samples
by member name).

>>> safe_extract("data.tar.gz", "data/")      # -> list of extracted files
"""
from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

__all__ = ["UnsafeArchiveError", "safe_member_name", "safe_extract"]


class UnsafeArchiveError(ValueError):
    """An archive member that would land outside the destination folder (or is a device,
    a link pointing out, or too large); nothing was extracted."""


def member_name_problem(name: str) -> str | None:
    """Why an archive member called ``name`` would land outside the folder it is read or
    extracted into (an absolute path, a drive letter, a ``..`` escape, a NUL byte, an empty
    name), or None when it stays inside. Shared by extraction and tar-shard reading."""
    if not name or "\x00" in name:
        return "has an empty name or a NUL byte"
    unixy = name.replace("\\", "/")
    if unixy.startswith("/") or (len(unixy) > 1 and unixy[1] == ":"):
        return "is an absolute path (path traversal)"
    norm = posixpath.normpath(unixy)
    if norm == ".." or norm.startswith("../"):
        return "points outside the destination folder (path traversal)"
    return None


def safe_member_name(name: str, archive: str | os.PathLike = "archive") -> str:
    """``name`` normalised to a relative POSIX path that stays inside the destination, or
    :class:`UnsafeArchiveError` saying why not (:func:`member_name_problem`)."""
    problem = member_name_problem(name)
    if problem is not None:
        raise UnsafeArchiveError(f"{os.fspath(archive)}: member {name!r} {problem}; refusing to extract")
    return posixpath.normpath(name.replace("\\", "/"))


def _inside(root: str, target: str) -> bool:
    return target == root or target.startswith(root + os.sep)


def _check_link(member_name: str, link: str, archive: str | os.PathLike) -> None:
    where = f"{os.fspath(archive)}: link {member_name!r} -> {link!r}"
    if not link or link.startswith("/") or (len(link) > 1 and link[1] == ":"):
        raise UnsafeArchiveError(f"{where} is absolute; refusing to extract (path traversal)")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(member_name), link))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(f"{where} points outside the destination folder; refusing to extract "
                                 "(path traversal)")


def _plan_tar(tf: tarfile.TarFile, archive: str | os.PathLike,
              max_bytes: int | None) -> list[tuple[tarfile.TarInfo, str]]:
    plan, total = [], 0
    for m in tf.getmembers():
        name = safe_member_name(m.name, archive)
        if m.issym() or m.islnk():
            # a hard link's target is named from the archive root, a symlink's from its folder
            _check_link(name if m.issym() else "x", m.linkname, archive)
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"{os.fspath(archive)}: member {m.name!r} is a device, FIFO or other special "
                                     "file; refusing to extract")
        total += max(m.size, 0)
        if max_bytes is not None and total > max_bytes:
            raise UnsafeArchiveError(f"{os.fspath(archive)} expands to more than {max_bytes} bytes; refusing to "
                                     "extract (raise max_bytes if you expect that)")
        plan.append((m, name))
    return plan


def _plan_zip(zf: zipfile.ZipFile, archive: str | os.PathLike,
              max_bytes: int | None) -> list[tuple[zipfile.ZipInfo, str]]:
    plan, total = [], 0
    for info in zf.infolist():
        name = safe_member_name(info.filename, archive)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeArchiveError(f"{os.fspath(archive)}: member {info.filename!r} is a symlink; refusing to "
                                     "extract links from a zip archive")
        total += info.file_size
        if max_bytes is not None and total > max_bytes:
            raise UnsafeArchiveError(f"{os.fspath(archive)} expands to more than {max_bytes} bytes; refusing to "
                                     "extract (raise max_bytes if you expect that)")
        plan.append((info, name))
    return plan


def _target(root: str, name: str, archive: str | os.PathLike) -> str:
    """The real destination path of ``name`` under ``root``, refusing any path that a link
    extracted earlier would redirect outside ``root``."""
    target = os.path.join(root, *name.split("/"))
    parent = os.path.realpath(os.path.dirname(target))
    if not _inside(root, parent):
        raise UnsafeArchiveError(f"{os.fspath(archive)}: member {name!r} would be written through a link to "
                                 f"{parent}, outside the destination; refusing to extract")
    return target


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike, *,
                 max_bytes: int | None = 64 << 30) -> list[Path]:
    """Extract a tar (any compression) or zip ``archive`` into ``dest`` (created).

    Every member is checked first; an absolute or ``..`` name, a link pointing outside
    ``dest``, a device/FIFO member, or more than ``max_bytes`` of content (a zip/tar bomb)
    raises :class:`UnsafeArchiveError` with nothing written. Returns the extracted files.
    """
    archive = Path(archive)
    root = os.path.realpath(dest)
    os.makedirs(root, exist_ok=True)
    out: list[Path] = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info, name in _plan_zip(zf, archive, max_bytes):
                target = _target(root, name, archive)
                if info.is_dir():
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                out.append(Path(target))
        return out
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError as e:
        raise ValueError(f"{archive} is neither a zip nor a tar archive ({e})") from None
    with tf:
        for m, name in _plan_tar(tf, archive, max_bytes):
            target = _target(root, name, archive)
            if m.isdir():
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.lexists(target):
                os.unlink(target)  # never write through an existing link
            if m.issym():
                os.symlink(m.linkname, target)
                if not _inside(root, os.path.realpath(target)):  # a link reached through another link
                    os.unlink(target)
                    raise UnsafeArchiveError(f"{archive}: link {m.name!r} -> {m.linkname!r} resolves outside the "
                                             "destination; refusing to extract (path traversal)")
            elif m.islnk():
                src_path = _target(root, safe_member_name(m.linkname, archive), archive)
                if not _inside(root, os.path.realpath(src_path)):
                    raise UnsafeArchiveError(f"{archive}: hard link {m.name!r} resolves outside the destination")
                shutil.copyfile(src_path, target)  # a copy, not a link to something the archive chose
            else:
                src = tf.extractfile(m)
                assert src is not None
                with src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.chmod(target, (m.mode & 0o755) | 0o600)
            out.append(Path(target))
    return out
