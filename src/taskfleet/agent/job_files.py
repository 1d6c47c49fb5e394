"""The files of the agent's jobs: staging folders and checkpoints (``agent/jobs.py``).

Contract:

* A job's staging folder is ``STATE_DIR/jobs/<op>``, an item's
  ``STATE_DIR/jobs/<op>/<item index>``; ``item_folder`` creates each level 0700
  and refuses a level that is a symlink or not a folder (``StagingError``).
* ``content_path`` is where content ``name`` goes in an item's folder: the name
  must pass ``domain.jobs.validate_content_name``, every folder on the way is a
  real one (created as needed), and neither the file nor its ``.part`` is a
  symlink; otherwise ``StagingError``. (A process of the agent's own user racing
  the check can still swap a folder in between: the staging tree is 0700.)
* ``copy_for_user`` gives a command run as another user its own copy of the item's
  folder: the state folder is 0700 and the agent's, so that user cannot enter the item's
  folder. The copy is a fresh 0700 folder in the system's temporary folder, owned by that
  user with everything in it; the caller removes it when the command ends (what the
  command leaves there is not kept for the item's later steps).
* ``remove_staging`` removes a job's staging folder (a symlink in its place is
  unlinked, never followed).
* ``Checkpoint`` is a job's resume checkpoint: which items Analyze found
  applicable, the finished steps with status and detail, whether a terminate
  arrived, whether every finished step's report is known to be queued. ``save``
  writes it atomically (temp file, fsync, rename, fsync of the folder), 0600;
  ``load`` gives None for a missing or unreadable one.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from taskfleet.agent import state as st
from taskfleet.domain.jobs import JOB, JobSpecError, Step, validate_content_name

JOBS_FOLDER = "jobs"


class StagingError(Exception):
    """A content path that would leave its item's staging folder."""


def staging_root(state_dir: Path, op: int) -> Path:
    return state_dir / JOBS_FOLDER / str(op)


def _folder(path: Path) -> None:
    """``path`` is a real folder (created 0700 if missing), never a symlink to one."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise StagingError(f"{path} is a symlink or not a folder: refused")


def item_folder(state_dir: Path, op: int, item: int) -> Path:
    """The item's staging folder, created folder by folder below the state folder."""
    path = state_dir
    for part in (JOBS_FOLDER, str(op), str(item)):
        path = path / part
        _folder(path)
    return path


def content_path(folder: Path, name: str) -> Path:
    """Where content ``name`` goes in ``folder``: it must stay inside it, through real
    folders only (no symlink on the way, none at the file or its ``.part``)."""
    try:
        validate_content_name(name)
    except JobSpecError as exc:
        raise StagingError(str(exc)) from None
    *dirs, base = name.split("/")
    path = folder
    for d in dirs:
        path = path / d
        _folder(path)
    dest = path / base
    for f in (dest, dest.with_name(base + ".part")):
        if f.is_symlink():
            raise StagingError(f"content name {name!r} is a symlink in the staging folder")
    if not dest.resolve().is_relative_to(folder.resolve()):
        raise StagingError(f"content name {name!r} leaves the staging folder")
    return dest


def copy_for_user(folder: Path, user: str) -> Path:
    """A private copy of ``folder`` that ``user`` owns (``KeyError``: no such user)."""
    account = pwd.getpwnam(user)
    run = Path(tempfile.mkdtemp(prefix="taskfleet-job-"))
    try:
        # Staging holds no symlinks (content_path refuses them); never follow one anyway.
        shutil.copytree(folder, run, symlinks=True, dirs_exist_ok=True)
        for root, dirs, files in os.walk(run):
            os.lchown(root, account.pw_uid, account.pw_gid)
            for name in (*dirs, *files):
                os.lchown(os.path.join(root, name), account.pw_uid, account.pw_gid)
    except BaseException:
        shutil.rmtree(run, ignore_errors=True)
        raise
    return run


def remove_staging(state_dir: Path, op: int) -> None:
    """Remove the job's staging folder (a symlink in its place is only unlinked)."""
    root = staging_root(state_dir, op)
    if root.is_symlink():
        root.unlink()
    else:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Checkpoint:
    applicable: dict[int, bool] = field(default_factory=dict)
    done: dict[Step, tuple[str, str]] = field(default_factory=dict)  # step -> status, detail
    terminate: bool = False
    # Every finished step's report is queued (set when the run waits for a window): a
    # resume then has nothing to report again. A crash can only come between a
    # checkpoint and its report while a step is recorded, which clears it.
    reported: bool = False

    @property
    def statuses(self) -> dict[Step, str]:
        return {s: status for s, (status, _) in self.done.items()}

    @classmethod
    def load(cls, path: Path) -> Checkpoint | None:
        """The checkpoint at ``path``; None when there is none. One that cannot be read
        counts as none (the run starts over); ``save`` writes whole files only."""
        try:
            d = json.loads(path.read_bytes())
            return cls(
                {int(k): bool(v) for k, v in d["applicable"].items()},
                {(p, int(i)): (s, str(t)) for p, i, s, t in d["done"]},
                bool(d["terminate"]),
                bool(d.get("reported", False)),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, path: Path) -> None:
        """Atomically: a crash leaves the old checkpoint or the new one, whole."""
        text = json.dumps(
            {
                "v": 1,
                "applicable": {str(k): v for k, v in self.applicable.items()},
                "done": [[p, i, s, t] for (p, i), (s, t) in self.done.items()],
                "terminate": self.terminate,
                "reported": self.reported,
            }
        ).encode()
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def sweep_staging(state: st.LocalState, state_dir: Path) -> list[int]:
    """Remove what finished jobs left (staging folders, checkpoints) after a crash
    between their end and the cleanup; returns the operations swept."""
    swept = []
    for folder in (JOBS_FOLDER, "checkpoints"):
        try:
            names = [e.name for e in os.scandir(state_dir / folder) if e.name.isdigit()]
        except FileNotFoundError:
            continue
        for name in names:
            op = state.operation(int(name))
            if folder == JOBS_FOLDER and (op is None or op.finished):
                remove_staging(state_dir, int(name))
                swept.append(int(name))
            elif op is not None and op.finished and op.type == JOB:
                op.checkpoint_path(state_dir).unlink(missing_ok=True)
    return swept
