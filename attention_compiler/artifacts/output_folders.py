"""Output folders that appear whole or not at all, and that never take the place of anything this
tool did not write.

A run claims each of its output folders before any work starts (``claim``): the path is checked
(not empty, UTF-8, names within the file system's limit), resolved through symlinks, and refused
when it is a file, the working folder or one of its parents, a git repository, the home folder, or,
without ``force``, a folder that is not empty. With ``force`` an existing folder is replaced only
when this tool wrote it: its marker (``manifest.json`` for compile.py's folder, the first line of
``config.pbtxt`` for a Triton model) says so and it holds nothing the marker does not list.

The work goes into staging folders beside the outputs (``staged``). They are swapped in together,
under a lock on each parent folder, only if every output is still what it was when it was claimed;
so of two runs into one folder, with or without ``force``, exactly one wins, and a failure or a
signal leaves the old folders as they were and no staging folder behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

WRITTEN_BY = "attention-compiler"
TRITON_MARKER = (
    f"# written by {WRITTEN_BY} (compile.py --triton-repo); --force may replace this model folder"
)
MANIFEST_LIMIT = 64 * 2**20  # bytes: a manifest this tool writes is far smaller
NAME_MAX = 255  # bytes of one path component on Linux, macOS and Windows file systems
_STAGING_SUFFIXES = (".partial", ".old")


class ArtifactError(OSError):
    """The output cannot be written as asked (exit 1): a full disk, or another run took the folder."""


class OutputRefused(ArtifactError):
    """An output path this tool must not write to, refused before any work (exit 2)."""


def show(path: str | os.PathLike[str]) -> str:
    """A path for a message: quoted, with bytes that are not UTF-8 escaped, cut to a sane length."""
    text = os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return repr(text if len(text) <= 160 else text[:80] + "..." + text[-60:])


def _ours_compile(folder: Path) -> str | None:
    """Why ``folder`` is not a compile.py output folder, or None when it is."""
    manifest = folder / "manifest.json"
    try:
        info = manifest.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > MANIFEST_LIMIT:
            return "its manifest.json is not a file compile.py writes"
        data = json.loads(manifest.read_bytes())
    except (OSError, ValueError):
        return "it has no readable manifest.json"
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("files"), dict)
        or not (data.get("written_by") == WRITTEN_BY or {"target", "tools"} <= data.keys())
    ):
        return "its manifest.json was not written by compile.py"
    listed = {"manifest.json", *map(str, data["files"])}
    foreign = sorted(
        p.name for p in folder.iterdir() if p.name not in listed or p.is_symlink() or p.is_dir()
    )
    return f"it holds {_names(foreign)}, which compile.py did not write" if foreign else None


def _ours_triton(folder: Path) -> str | None:
    """Why ``folder`` is not a Triton model folder compile.py wrote, or None when it is."""
    config = folder / "config.pbtxt"
    try:
        if not stat.S_ISREG(config.lstat().st_mode):
            raise OSError
        with open(config, "rb") as f:
            first = f.readline(len(TRITON_MARKER) + 2).decode("utf-8", "replace").rstrip("\n")
    except OSError:
        return "it has no config.pbtxt compile.py wrote"
    if first != TRITON_MARKER:
        return "its config.pbtxt was not written by compile.py"
    foreign = [
        p.name for p in folder.iterdir() if p.name not in ("config.pbtxt", "1") or p.is_symlink()
    ]
    version = folder / "1"
    if version.is_dir() and not version.is_symlink():
        foreign += [
            f"1/{p.name}" for p in version.iterdir() if not (_served_file(p) or _model_bytecode(p))
        ]
    return (
        f"it holds {_names(sorted(foreign))}, which compile.py did not write" if foreign else None
    )


def _served_file(path: Path) -> bool:
    names = ("model.onnx", "model.onnx.data", "model.plan", "model.py")
    return path.name in names and path.is_file() and not path.is_symlink()


def _model_bytecode(path: Path) -> bool:
    """The __pycache__ Python writes beside model.py when Triton's python backend imports it."""
    if path.name != "__pycache__" or path.is_symlink() or not path.is_dir():
        return False
    return all(
        re.fullmatch(r"model\.[\w-]+\.pyc", p.name) and p.is_file() and not p.is_symlink()
        for p in path.iterdir()
    )


OWNERS: dict[str, Callable[[Path], str | None]] = {"compile": _ours_compile, "triton": _ours_triton}


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _identity(path: Path) -> tuple | None:
    """What sits at ``path`` now, to notice another run replacing it: None when nothing does."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(info.st_mode) and not any(path.iterdir()):
        return ("empty",)
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_mode)


@dataclass
class Output:
    """A claimed output folder: ``path`` is where it goes (symlinks resolved), ``given`` as the user spelled it."""

    given: str
    flag: str
    path: Path
    owner: str
    force: bool
    previous: tuple | None = None
    created: list[Path] = field(
        default_factory=list
    )  # parent folders this run made, removed if it fails

    def _still_claimable(self) -> None:
        if _identity(self.path) != self.previous:
            raise ArtifactError(
                f"output folder {show(self.path)} was written by another run while this one worked; "
                "this run's files were discarded"
            )
        if self.previous not in (None, ("empty",)) and (why := OWNERS[self.owner](self.path)):
            raise OutputRefused(
                f"{self.flag} {show(self.given)} changed while this run worked: {why}; "
                "this run's files were discarded"
            )


def _name_problem(path: str) -> str | None:
    if path == "":
        return "is empty (an unset variable?); expected a folder path"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "holds bytes that are not UTF-8; expected a path in UTF-8 text"
    if "\0" in path:
        return "holds a NUL byte"
    long = [part for part in Path(path).parts if len(part.encode()) > NAME_MAX]
    if long:
        return (
            f"has a name of {len(long[0].encode())} bytes ({long[0][:40]}...), longer than the {NAME_MAX} "
            "a file system allows"
        )
    return None


def check_model_name(name: object) -> None:
    """OutputRefused unless ``name`` is one path component Triton serves: letters, digits, '_', '-'
    and '.', not starting with '.' (so never '.' or '..', nor a hidden folder Triton skips)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}", name):
        shown = show(name) if isinstance(name, str) else f"of type {type(name).__name__}"
        raise OutputRefused(
            f"--triton-model-name {shown} is not a model name Triton serves; expected one folder "
            "name of letters, digits, '_', '-' and '.', not starting with '.', at most 200 characters"
        )


def check_path_text(path: str, flag: str) -> None:
    """OutputRefused unless ``path`` is a usable name: not empty, UTF-8, every component within NAME_MAX."""
    if (problem := _name_problem(path)) is not None:
        raise OutputRefused(f"{flag} {show(path)} {problem}")


def _protected(real: Path) -> str | None:
    """Why a folder may never be an output: it holds the user's work."""
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if cwd == real:
        return "is the working folder"
    if cwd.is_relative_to(real):
        return "is a parent of the working folder"
    if home.is_relative_to(real):
        return "is the home folder or a parent of it"
    try:
        if (real / ".git").exists():
            return "is a git repository"
    except OSError:  # a folder we may not look into is no place to write either; the claim says why
        pass
    if Path(__file__).resolve().is_relative_to(real):
        return "holds this tool's own code"
    return None


def claim(
    given: str | os.PathLike[str], *, force: bool, flag: str = "--out", owner: str = "compile"
) -> Output:
    """Check that ``given`` may receive this run's output folder; OutputRefused (one sentence) if not."""
    given = os.fspath(given)
    check_path_text(given, flag)
    real = Path(os.path.realpath(given))
    if real.name in ("", ".", ".."):
        raise OutputRefused(
            f"{flag} {show(given)} is the root folder; expected a folder of its own"
        )
    if (why := _protected(real)) is not None:
        raise OutputRefused(
            f"{flag} {show(given)} {why}; compile.py writes only into a new folder or one it wrote itself"
        )
    output = Output(given, flag, real, owner, force)
    try:
        info = real.lstat()
    except FileNotFoundError:
        return output
    except OSError as exc:
        raise OutputRefused(
            f"{flag} {show(given)} cannot be examined: {exc.strerror or exc}"
        ) from exc
    if not stat.S_ISDIR(info.st_mode):
        raise OutputRefused(
            f"{flag} {show(given)} is a file, not a folder; compile.py never replaces a file, give a "
            "folder path"
        )
    output.previous = _identity(real)
    if output.previous != ("empty",):
        if not force:
            raise OutputRefused(
                f"{flag} folder {show(given)} already exists and is not empty; pass --force to replace "
                "a folder compile.py wrote"
            )
        if (why := OWNERS[owner](real)) is not None:
            raise OutputRefused(
                f"{flag} folder {show(given)} was not written by compile.py ({why}); --force replaces "
                "only folders compile.py wrote, so remove it yourself or choose another folder"
            )
    return output


def check_apart(a: Output, b: Output, b_root: tuple[str, Path] | None = None) -> None:
    """Two outputs of one run may not hold each other: the later would replace or pollute the earlier.
    ``b_root`` (as given, resolved) is a folder ``b`` lies in that ``a`` must stay out of too (the
    Triton repository, which Triton reads whole)."""
    given, outer = b_root or (b.given, b.path)
    if a.path == b.path or a.path.is_relative_to(outer) or outer.is_relative_to(a.path):
        raise OutputRefused(
            f"{a.flag} {show(a.given)} and {b.flag} {show(given)} overlap; each output needs a folder "
            "of its own, outside the other"
        )


def claim_outputs(
    out: str | os.PathLike[str],
    *,
    force: bool,
    triton_repo: str | os.PathLike[str] | None = None,
    triton_model_name: str = "attention",
    inputs: dict[str, str | os.PathLike[str] | None] | None = None,
) -> list[Output]:
    """The output folder, and the Triton model folder, checked before any work: never a file, the
    working folder or a parent of it, a repository, the other output, a folder holding one of
    ``inputs`` (flag: path), or (with ``force``) a folder this tool did not write."""
    outputs = [claim(out, force=force, flag="--out")]
    if triton_repo is not None:
        check_model_name(triton_model_name)
        triton_repo = os.fspath(triton_repo)
        check_path_text(triton_repo, "--triton-repo")
        repo = Path(os.path.realpath(triton_repo))
        if repo.exists() and not repo.is_dir():
            raise OutputRefused(f"--triton-repo {show(triton_repo)} is a file, not a folder")
        model = claim(
            os.path.join(triton_repo, triton_model_name),
            force=force,
            flag="--triton-repo",
            owner="triton",
        )
        check_apart(outputs[0], model, (triton_repo, repo))
        outputs.append(model)
    for flag, given in (inputs or {}).items():
        if given is None:
            continue
        source = Path(os.path.realpath(given))
        for output in outputs:
            if source.is_relative_to(output.path):
                raise OutputRefused(
                    f"{flag} {show(given)} lies inside {output.flag} {show(output.given)}, which this "
                    "run would replace; copy it elsewhere first"
                )
    return outputs


def _staging_name(out: Path) -> str:
    """A prefix for the staging folder whose whole name (prefix, 8 random characters, suffix) stays
    within NAME_MAX, however long the output's own name."""
    room = NAME_MAX - len(".") - len(".") - 8 - max(map(len, _STAGING_SUFFIXES))
    return "." + out.name.encode()[:room].decode("utf-8", "ignore") + "."


def _make_parents(output: Output) -> None:
    missing = []
    for parent in [output.path.parent, *output.path.parent.parents]:
        if parent.exists():
            break
        missing.append(parent)
    for parent in reversed(missing):
        try:
            parent.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise ArtifactError(
                f"cannot create the folder {show(parent)}: {exc.strerror or exc}"
            ) from exc
        output.created.append(parent)


def _remove_created(output: Output) -> None:
    for parent in reversed(output.created):
        with contextlib.suppress(OSError):
            parent.rmdir()  # only while empty: another run may have put something there


@contextlib.contextmanager
def _parents_locked(outputs: list[Output]) -> Iterator[None]:
    """An exclusive lock on each output's parent folder, in one order, with signals held back, so
    two runs cannot interleave their swaps and a signal cannot stop one half-way."""
    held = []
    blocked = signal.pthread_sigmask(
        signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    )
    try:
        for parent in sorted({o.path.parent for o in outputs}):
            fd = os.open(parent, os.O_RDONLY)
            held.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in held:
            os.close(fd)  # releases the lock
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _swap_in(output: Output, staging: Path) -> Path | None:
    """Rename ``staging`` to the output; returns the folder holding the replaced one, if any."""
    old = None
    if output.previous == ("empty",):
        output.path.rmdir()
    elif output.previous is not None:
        old = Path(
            tempfile.mkdtemp(
                prefix=_staging_name(output.path), suffix=".old", dir=output.path.parent
            )
        )
        os.rename(output.path, old / "replaced")
    try:
        os.rename(staging, output.path)
    except OSError as exc:
        if old is not None:
            with contextlib.suppress(OSError):
                os.rename(old / "replaced", output.path)
                old.rmdir()
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise ArtifactError(
                f"output folder {show(output.path)} was written by another run while this one worked; "
                "this run's files were discarded"
            ) from exc
        raise ArtifactError(
            f"cannot move the finished output into {show(output.path)}: {exc.strerror or exc}"
        ) from exc
    return old


def _swap_back(output: Output, staging: Path, old: Path | None) -> None:
    """Undo ``_swap_in``: the new folder goes back to staging (to be removed), the old one returns."""
    with contextlib.suppress(OSError):
        os.rename(output.path, staging)
        if old is not None:
            os.rename(old / "replaced", output.path)
            old.rmdir()
        elif output.previous == ("empty",):
            output.path.mkdir()


@contextlib.contextmanager
def staged(*outputs: Output) -> Iterator[list[Path]]:
    """One staging folder beside each output; when the block completes they replace the outputs
    together, or none does. Any failure, or SIGINT/SIGTERM turned into an exception, removes them."""
    stagings: list[Path] = []
    try:
        for output in outputs:
            _make_parents(output)
            try:
                staging = Path(
                    tempfile.mkdtemp(
                        prefix=_staging_name(output.path), suffix=".partial", dir=output.path.parent
                    )
                )
            except OSError as exc:
                raise ArtifactError(
                    f"cannot create a folder beside {show(output.path)}: {exc.strerror or exc}"
                ) from exc
            stagings.append(staging)
            staging.chmod(0o777 & ~umask())  # mkdtemp makes it private; the artifact is not
        yield stagings
        replaced: list[tuple[Output, Path, Path | None]] = []
        with _parents_locked(list(outputs)):
            for output in outputs:
                output._still_claimable()
            try:
                for output, staging in zip(outputs, stagings):
                    replaced.append((output, staging, _swap_in(output, staging)))
            except BaseException:
                for output, staging, old in reversed(replaced):
                    _swap_back(output, staging, old)
                raise
        for _, _, old in replaced:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        for staging in stagings:
            shutil.rmtree(staging, ignore_errors=True)
        for output in outputs:
            _remove_created(output)
        raise


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """One output folder, claimed and staged: ``out`` appears whole when the block completes."""
    with staged(claim(out, force=force)) as (staging,):
        yield staging


def check_output_file(given: str, flag: str) -> Path:
    """A file output (bench.py's --json, --plot) checked before the work it reports: OutputRefused
    unless its name is usable, its folder exists, and nothing but a file is there to replace."""
    check_path_text(given, flag)
    path = Path(os.path.realpath(given))
    if path.exists() and not path.is_file():
        raise OutputRefused(
            f"{flag} {show(given)} is a folder or a device, not a file; give a file path"
        )
    if not path.parent.is_dir():
        raise OutputRefused(
            f"{flag} {show(given)} lies in a folder that does not exist ({show(path.parent)})"
        )
    if not os.access(path.parent, os.W_OK):
        raise OutputRefused(
            f"{flag} {show(given)} lies in a folder this user cannot write ({show(path.parent)})"
        )
    return path


def write_file_atomically(path: Path, data: bytes) -> None:
    """``path`` replaced by ``data`` whole, or left as it was (no temporary file is left either way)."""
    fd, temp = tempfile.mkstemp(prefix=_staging_name(path), suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~umask())  # mkstemp makes it private; the file is not
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise ArtifactError(f"cannot write {show(path)}: {exc.strerror or exc}") from exc
        raise


def umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask
