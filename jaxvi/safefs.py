"""File-system primitives for saving and loading: one atomic switch per save, bounded reads
of regular files only, and modes that follow the umask.

Saving (:func:`replace_directory`) writes the whole new version of a directory under a
hidden sibling name (``.<name>.jaxvi-<random>``), flushes it to disk, then swaps it with the
old directory in one ``renameat2(RENAME_EXCHANGE)`` call (Linux >= 3.15 on ext4, xfs, btrfs,
tmpfs, overlayfs, ...). A process killed at any moment therefore leaves the directory holding
either the complete old or the complete new version; a staging directory may be left beside
it and is safe to delete. Writers to one directory take an exclusive ``flock`` on it, so
concurrent saves cannot interleave (the last one wins, whole). Entries of the old directory
that the save does not own (a model card, notes, figures) are hard-linked into the new one.
Where the exchange is unavailable (another OS, NFS) the old directory is renamed away and the
new one renamed in: two renames, with a moment in which the name is absent but both versions
are complete on disk.

Loading (:func:`open_directory`, :func:`open_regular`) opens the directory once and every
file relative to it, refusing anything that is not a regular file (a FIFO, a device such as
``/dev/zero``) without blocking, so all files come from one version even while a save
switches the directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import stat
import warnings
from collections.abc import Callable, Iterable

__all__ = [
    "exchange",
    "fsync_dir",
    "open_directory",
    "open_regular",
    "read_bounded",
    "replace_directory",
    "write_file_atomically",
]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc_renameat2():
    if not hasattr(os, "O_DIRECTORY"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


def exchange(a: str, b: str) -> bool:
    """Swap the directory entries ``a`` and ``b`` atomically; False where the platform or
    file system cannot (the caller then falls back to two renames)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (
        errno.EINVAL,
        errno.ENOSYS,
        errno.ENOTSUP,
        errno.EOPNOTSUPP,
        errno.EPERM,
        errno.EBUSY,
        errno.EXDEV,
    ):
        return False
    raise OSError(err, os.strerror(err), b)


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (a rename in it) to disk, where the OS allows."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir_unique(parent: str, base: str) -> str:
    """A new empty directory ``parent/.base.jaxvi-<random>``, mode ``0o777 & ~umask``."""
    while True:
        path = os.path.join(parent, f".{base}.jaxvi-{secrets.token_hex(6)}")
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: str, new: str, owned: Iterable[str]) -> None:
    """Hard-link (or copy) every entry of ``old`` not in ``owned`` and not already in
    ``new`` into ``new``: files the save does not own survive the switch."""
    owned = set(owned)
    for name in os.listdir(old):
        if name in owned or name.startswith(".tmp-") or os.path.lexists(os.path.join(new, name)):
            continue
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        elif os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isfile(src):
            _link_or_copy(src, dst)


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                fsync_file(os.path.join(root, name))
        fsync_dir(root)


def replace_directory(
    dir_path: str,
    fill: Callable[[str], None],
    owned: Iterable[str],
    refuse_existing: Callable[[str], None] | None = None,
) -> None:
    """Make ``dir_path`` hold what ``fill(stage)`` writes, switching atomically.

    Parameters
    ----------
    dir_path
        The directory to create or replace (a symbolic link is followed).
    fill
        Writes the new files into the empty staging directory it is given.
    owned
        Names the save owns: the old directory's entries of these names are dropped (the
        new version has them or deliberately lacks them); every other entry is kept.
    refuse_existing
        Called with the existing directory's path under the writers' lock; raises to refuse
        replacing it (e.g. a model is there and ``overwrite`` is False).
    """
    owned = tuple(owned)
    target = os.path.realpath(dir_path)
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    if refuse_existing is not None and os.path.isdir(target):
        refuse_existing(target)  # early, before writing anything
    stage = _mkdir_unique(parent, base)
    try:
        fill(stage)
        _fsync_tree(stage)
        while True:
            try:
                fd = os.open(target, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except FileNotFoundError:
                try:
                    os.rename(stage, target)  # fails if another writer created it meanwhile
                except OSError as e:
                    if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        continue
                    raise
                stage = None
                fsync_dir(parent)
                return
            try:
                _lock(fd)
                if os.stat(target).st_ino != os.fstat(fd).st_ino:
                    continue  # switched while this writer waited: lock the new one
                if refuse_existing is not None:
                    refuse_existing(target)
                _carry_over(target, stage, owned)
                os.chmod(stage, stat.S_IMODE(os.fstat(fd).st_mode))
                fsync_dir(stage)
                old = _switch(stage, target, parent, base, owned)
                fsync_dir(parent)
                stage = None
                shutil.rmtree(old, ignore_errors=True)
                return
            finally:
                os.close(fd)  # releases the lock
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    with contextlib.suppress(OSError):  # a file system without locks: go on unlocked
        fcntl.flock(fd, fcntl.LOCK_EX)


def _switch(stage: str, target: str, parent: str, base: str, owned: Iterable[str]) -> str:
    """Put ``stage`` at ``target``; returns where the old version now is (to delete)."""
    if exchange(stage, target):
        return stage
    old = _mkdir_unique(parent, base + ".old")
    os.rmdir(old)
    try:
        os.rename(target, old)
    except OSError as e:  # a mount point or the like: write into it file by file
        warnings.warn(
            f"Could not replace {target} atomically ({e}); its files are replaced one by one.",
            RuntimeWarning,
            stacklevel=4,
        )
        new = set(os.listdir(stage))
        for name in set(owned) - new:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(target, name))
        for name in sorted(new, key=lambda n: n.endswith(".json")):
            if name in set(owned):
                os.replace(os.path.join(stage, name), os.path.join(target, name))
        return stage
    os.rename(stage, target)
    return old


def write_file_atomically(path: str, write: Callable[[str], None]) -> None:
    """Write one file through ``write(tmp)`` then rename it over ``path``, fsynced.

    The new file gets the mode of the file it replaces, else ``0o666 & ~umask`` (what
    ``open`` gives), not ``mkstemp``'s 0600.
    """
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(6)}-{os.path.basename(path)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# ------------------------------------------------------------------------------ reading
def open_directory(path: str) -> int:
    """A file descriptor of the directory ``path`` (files are then opened relative to it,
    so all come from the version that was there at this moment)."""
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def open_regular(name: str, dir_fd: int | None = None, what: str | None = None):
    """``name`` (relative to ``dir_fd``) opened for binary reading; ``ValueError`` without
    blocking when it is not a regular file (a FIFO, a device, a directory)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(name, flags, dir_fd=dir_fd)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(
                f"{what or name} is not a regular file (it is a "
                f"{'FIFO' if stat.S_ISFIFO(mode) else 'device or directory'}); refused."
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(f, max_bytes: int, what: str) -> bytes:
    """All of the open regular file ``f``, refusing one larger than ``max_bytes``."""
    size = os.fstat(f.fileno()).st_size
    if size > max_bytes:
        raise ValueError(f"{what} is {size} bytes, more than the {max_bytes} allowed; refused.")
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{what} grew past {max_bytes} bytes while being read; refused.")
    return data
