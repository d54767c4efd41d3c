"""A run dir's life: checked writable before any model loads; after a failed start, only what this process created
is removed; shared by any number of writer processes, which claim images one batch at a time under the run dir's
lock (filelock), so each image is made once and no file is ever overwritten by an image of another key.

State, in `RUN_DIR/.t2i/`: `lock` (the run dir's lock), `claims/<writer>.jsonl` (what each live writer is making;
`<writer>.lock` is held while it lives, so a killed writer's claims are recognised and freed), `next_number` (file
numbers are never reused), `run.json` (the run seed that `-1` seeds are drawn from) and `replaced.jsonl` (lines of
images a `resume=false` run regenerated in place, folded into the manifest at the end of the run or the start of
the next).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from ..common.errors import ConfigError
from ..common.io import TMP_SUFFIX, atomic_write_bytes
from ..plan import KEY_VERSION, ImageJob
from .manifest import MANIFEST, Manifest, Tail, append_line, dumps, one_per_file, parse_lines
from .thumbs import SMALL_DIR, THUMB_DIR

log = logging.getLogger(__name__)
STATE = ".t2i"
CLAIMS = "claims"
REPLACED = "replaced.jsonl"
_NUMBERED = re.compile(r"^(\d+)_.+\.png$")
_TEMP = re.compile(r"^\.(.+)\.\d+" + re.escape(TMP_SUFFIX) + "$")  # common.io.atomic_write_bytes's temp names

# --------------------------------------------------------------------------------------------------------------
# What this process created, so that a failed start removes exactly that and nothing that was there before.
# --------------------------------------------------------------------------------------------------------------
_created: dict[str, list[Path]] = {}
_created_lock = threading.Lock()


def _owner(run_dir: str | os.PathLike) -> str:
    return os.path.abspath(run_dir)


def make_dirs(path: str | os.PathLike, owner: str | os.PathLike | None = None) -> None:
    """`mkdir -p path`, remembering the folders this process created (for the run dir `owner`, default `path`)."""
    path = Path(os.path.abspath(path))
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # made by someone else meanwhile: not ours
            continue
        note_created(owner or path, d)


def note_created(run_dir: str | os.PathLike, path: str | os.PathLike) -> None:
    """Remember that this process created `path` for `run_dir`."""
    with _created_lock:
        _created.setdefault(_owner(run_dir), []).append(Path(os.path.abspath(path)))


def check_writable(path: str | os.PathLike, what: str = "output_dir") -> None:
    """Create `path` if needed and write a probe file in it; one ConfigError line naming it otherwise."""
    path = Path(path)
    try:
        make_dirs(path)
        probe = path / f".t2i-probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        remove_created(path)
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot write to {what}={path} ({reason}); give a folder you can write to") from exc


# what only this tool's run/sweep dirs hold (a writer starting beside another sees Hydra's log before `.t2i/`)
_OURS = (STATE, ".hydra", "multirun.yaml", "sweep_manifest.jsonl", "t2i.log", "t2i-train.log")


def check_not_foreign(path: str | os.PathLike, what: str = "output_dir") -> None:
    """Refuse (one ConfigError line) a non-empty folder that is not this tool's run dir, sweep dir or merge: its
    files (an index.html, a manifest.jsonl, grids/) would be overwritten or appended to. Ours: it holds `.t2i/`,
    Hydra's `.hydra/` or log, a sweep's files, run dirs, or a manifest whose lines are all ours (a merge)."""
    path = Path(path)
    if not path.is_dir():
        return
    names = [n for n in os.listdir(path) if not n.startswith(".t2i-probe.")]  # a concurrent writer's probe
    if not names or any((path / n).exists() for n in _OURS):
        return
    if any((path / n / STATE).is_dir() or (path / n / MANIFEST).is_file() for n in names):
        return  # a sweep or shards' parent: its subfolders are run dirs (t2i-merge writes beside them)
    manifest = path / MANIFEST
    if manifest.is_file():
        data = manifest.read_bytes()
        lines = [ln for ln in data.split(b"\n") if ln.strip()]
        if lines and len(parse_lines(data)) == len(lines):
            return
    shown = ", ".join(sorted(names)[:3]) + (", …" if len(names) > 3 else "")
    raise ConfigError(f"{what}={path} is a non-empty folder that is not a t2i run dir (it holds {shown}); "
                      "give a new or empty folder, or a run dir t2i made")


def remove_created(run_dir: str | os.PathLike) -> None:
    """After a failed start: remove what this process created for `run_dir` (Hydra's `.hydra` and log, the state
    folder, the folders themselves, children first) — nothing at all once an image is in it, and never a folder
    that holds something this process did not put there."""
    with _created_lock:
        made = _created.pop(_owner(run_dir), [])
    if (Path(run_dir) / MANIFEST).exists():
        return
    for p in reversed(made):
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        elif p.name == ".hydra" or (p.name == STATE and not any((p / CLAIMS).glob("*.jsonl"))):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.rmdir()  # only when empty


def forget_created(run_dir: str | os.PathLike) -> None:
    """The run started: what it created is the run's now."""
    with _created_lock:
        _created.pop(_owner(run_dir), None)


# --------------------------------------------------------------------------------------------------------------
# Seeds drawn for `-1`: from a seed stored once per run dir (or sweep dir), so every writer and resume agrees.
# --------------------------------------------------------------------------------------------------------------
def stored_seed(path: Path) -> int:
    """The run seed stored in the JSON file `path`, created with a random one the first time (under a lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        try:
            return int(json.loads(path.read_text(encoding="utf-8"))["run_seed"])
        except (OSError, ValueError, KeyError, TypeError):
            seed = secrets.randbelow(2**32)
            atomic_write_bytes(path, json.dumps({"run_seed": seed}).encode())
            return seed


# --------------------------------------------------------------------------------------------------------------
# Writers sharing a run dir.
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """An image this writer makes: its file name and number in the run dir. `replaces`: `resume=false`
    regenerates an image already there, into its own file (same key)."""

    job: ImageJob
    file: str
    number: int
    replaces: bool = False


@dataclass
class _Peer:
    """Another writer of the run dir, known by its claims file."""

    path: Path
    keys: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)
    tail: Tail | None = None

    def read(self) -> None:
        self.tail = self.tail or Tail(self.path)
        for line in self.tail.read()[0]:
            self.keys.add(line["key"])
            self.files.add(line["file"])


class RunDir:
    """This process's session as one writer of a run dir (others may be writing it at the same time).

    `open()` recovers the run dir (torn lines, lines of missing files, temp files and claims of dead writers,
    files a killed writer renamed into place without a line) and reads what is done; `claim()` takes the next
    images no one else has made or is making and gives each a new file number; `commit()` records a finished
    file; `close()` releases what is left and says whether this was the last writer."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.state = self.path / STATE
        self.manifest = Manifest(self.path)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.done: dict[str, dict] = {}  # key -> its manifest line (the first file of a key)
        self.legacy = 0  # lines whose key is of an older version (never equal to the keys made now)
        self._files: set[str] = set()  # files that have a manifest line
        self._mine: set[str] = set()  # keys this writer claimed
        self._peers: dict[str, _Peer] = {}
        self._tail = Tail(self.manifest.path)
        self._tlock = threading.RLock()  # writer threads and the generating thread of this process
        self._flock: FileLock | None = None
        self._alive: FileLock | None = None
        self._claims = self.state / CLAIMS / f"{self.id}.jsonl"

    # -- the run dir's lock ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._tlock, self._flock:
            yield

    # -- session ----------------------------------------------------------------------------------------------
    def open(self) -> RunDir:
        """Recover the run dir and start this writer's session (its claims file, held alive by a lock)."""
        make_dirs(self.state / CLAIMS, owner=self.path)
        self._flock = FileLock(self.state / "lock", thread_local=False)
        self._alive = FileLock(self._claims.with_suffix(".lock"), thread_local=False)
        self._alive.acquire()
        with self._locked():
            self._refresh_peers()  # frees the claims of writers that were killed
            self.done, self._files, self.legacy = {}, set(), 0
            names = {d.name for d in os.scandir(self.path)}
            busy = self._peer_files()
            self._remove_stale_temp(names, busy)
            self._fold_replacements()
            entries = self.manifest.recover(names)
            listed = {e["file"] for e in entries}
            entries += self._adopt(sorted(n for n in names - listed - busy if n.endswith(".png")))
            self._absorb(entries)
            self._tail.skip()  # from here on, only what others append is new
            top = max([_number(n) for n in names] + [int(e.get("index", -1)) for e in entries], default=-1)
            self._write_next(max(top + 1, self._read_next()))
            self._claims.touch()
        if self._peers:
            log.info("sharing %s with %d other writer(s): %s", self.path, len(self._peers), ", ".join(self._peers))
        if self.legacy:
            log.warning("%s holds %d image(s) keyed by an older t2i-runner; they stay listed, and images of this "
                        "run are made anew under new file names", self.path, self.legacy)
        return self

    def close(self) -> bool:
        """Fold in this run's replacements, drop this writer's claims; True if no other writer is left."""
        if self._alive is None:
            return True
        with self._locked():
            self._fold_replacements()
            self._refresh()
            self._claims.unlink(missing_ok=True)
            self._refresh_peers()
            last = not self._peers
        self._alive.release()
        self._claims.with_suffix(".lock").unlink(missing_ok=True)
        self._alive = None
        return last

    def __enter__(self) -> RunDir:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_seed(self) -> int:
        """The run dir's seed for `-1` seeds (made once, then read by every writer and resume)."""
        return stored_seed(self.state / "run.json")

    def grids_lock(self) -> FileLock:
        """Held while grids are written (one writer at a time)."""
        return FileLock(self.state / "grids.lock", thread_local=False)

    # -- claims -----------------------------------------------------------------------------------------------
    def claim(self, jobs: Sequence[ImageJob], replace: Iterable[str] = ()) -> list[Claim]:
        """Claim those of `jobs` that are neither done nor claimed by a live writer (keys in `replace` are made
        again even when done, into their own file); each new image gets the next unused file number."""
        replace = set(replace)
        with self._locked():
            self._refresh()
            self._refresh_peers()
            taken = set().union(*(p.keys for p in self._peers.values())) if self._peers else set()
            picked = [j for j in jobs if j.key not in taken and j.key not in self._mine
                      and (j.key not in self.done or j.key in replace)]
            claims, number = [], self._read_next()
            for job in picked:
                if job.key in self.done:
                    old = self.done[job.key]
                    claims.append(Claim(job, old["file"], int(old.get("index", _number(old["file"]))), True))
                    continue
                while (self.path / job.filename(number)).exists():  # a stray file never gets overwritten
                    number += 1
                claims.append(Claim(job, job.filename(number), number))
                number += 1
            if claims:
                self._write_next(number)
                append_line(self._claims, "".join(dumps({"key": c.job.key, "file": c.file}) for c in claims))
                self._mine.update(c.job.key for c in claims)
        return claims

    def commit(self, entry: dict, replaces: bool = False) -> None:
        """Record a finished file (its manifest line; for a replaced file, a line in the replacement journal)."""
        with self._locked():
            if replaces:
                append_line(self.state / REPLACED, dumps(entry))
            else:
                self.manifest.append(entry)

    def refresh(self) -> dict[str, dict]:
        """What is done now, by any writer."""
        with self._locked():
            self._refresh()
        return self.done

    @property
    def mine(self) -> set[str]:
        """The keys this writer claimed."""
        return self._mine

    def others(self) -> list[str]:
        """The other writers alive now."""
        with self._locked():
            self._refresh_peers()
            return sorted(self._peers)

    # -- internals (called under the lock) ----------------------------------------------------------------------
    def _absorb(self, entries: Iterable[dict]) -> None:
        for e in entries:
            self._files.add(e["file"])
            if int(e.get("record_version", 1)) < KEY_VERSION and e["key"] not in self.done:
                self.legacy += 1
            self.done.setdefault(e["key"], e)

    def _refresh(self) -> None:
        new, rewritten = self._tail.read()
        if rewritten:
            self.done, self._files, self.legacy = {}, set(), 0
        self._absorb(new)

    def _read_next(self) -> int:
        try:
            return int((self.state / "next_number").read_text())
        except (OSError, ValueError):
            return 0

    def _write_next(self, number: int) -> None:
        atomic_write_bytes(self.state / "next_number", str(number).encode())

    def _peer_files(self) -> set[str]:
        return set().union(*(p.files for p in self._peers.values())) if self._peers else set()

    def _refresh_peers(self) -> None:
        """Read the live writers' new claims; free the claims of writers that died (their lock is free)."""
        seen = set()
        for path in (self.state / CLAIMS).glob("*.jsonl"):
            wid = path.stem
            if wid == self.id:
                continue
            peer = self._peers.get(wid) or _Peer(path)
            if not _alive(path.with_suffix(".lock")):
                peer.read()
                self._reap(peer)
                continue
            peer.read()
            self._peers[wid] = peer
            seen.add(wid)
        for wid in set(self._peers) - seen:  # closed cleanly, or reaped above
            del self._peers[wid]
        for lock in (self.state / CLAIMS).glob("*.lock"):  # a writer killed before its claims file existed
            if lock.stem != self.id and not lock.with_suffix(".jsonl").exists() and _gone(lock):
                lock.unlink(missing_ok=True)

    def _reap(self, peer: _Peer) -> None:
        """A writer died: keep files it placed without a line, remove its temp files and its claims."""
        self._refresh()
        for name in sorted(peer.files - self._files):
            for tmp in self.path.glob(f".{glob.escape(name)}.*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
            if (self.path / name).is_file():
                self._absorb(self._adopt([name]))
        peer.path.unlink(missing_ok=True)
        peer.path.with_suffix(".lock").unlink(missing_ok=True)
        log.info("writer %s of %s stopped without finishing; its unfinished images are free again", peer.path.stem,
                 self.path)

    def _remove_stale_temp(self, names: set[str], busy: set[str]) -> None:
        """Temp files of writers that died mid-write: in the run dir, and the thumbnails' in thumbs/ and
        thumbs/small/ (`.<stem>.jpg.<pid>.tmp`); those of an image a live writer is making stay."""
        for name in names:
            m = _TEMP.match(name)
            if m and m.group(1) not in busy:
                (self.path / name).unlink(missing_ok=True)
        for folder in (self.path / THUMB_DIR, self.path / THUMB_DIR / SMALL_DIR):
            with contextlib.suppress(OSError):
                for entry in os.scandir(folder):
                    m = _TEMP.match(entry.name)
                    if m and f"{os.path.splitext(m.group(1))[0]}.png" not in busy:
                        Path(entry.path).unlink(missing_ok=True)

    def _adopt(self, names: Sequence[str]) -> list[dict]:
        """Lines for image files a killed writer renamed into place but had not listed yet (read from the record
        inside the PNG, no decoding). Other files are left as they are."""
        from .metadata import read_png_record

        adopted, strays = [], []
        for name in names:
            try:
                rec, _ = read_png_record(str(self.path / name))
            except Exception:  # noqa: BLE001 - not a readable PNG: not ours to judge
                rec = None
            if not rec or not isinstance(rec.get("key"), str):
                strays.append(name)
                continue
            mtime = (self.path / name).stat().st_mtime
            entry = {**rec, "file": name, "index": _number(name), "adopted": True,
                     "created": datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds")}
            self.manifest.append(entry)
            adopted.append(entry)
        if strays:
            log.warning("%d file(s) in %s are not images of this run dir (e.g. %s); left as they are", len(strays),
                        self.path, strays[0])
        return adopted

    def _fold_replacements(self) -> None:
        """Put the lines of images regenerated in place (`resume=false`) into the manifest, one line per file."""
        journal = self.state / REPLACED
        try:
            lines = parse_lines(journal.read_bytes())
        except FileNotFoundError:
            return
        if lines:
            newer = {e["file"]: e for e in lines}
            entries = [newer.pop(e["file"], e) for e in self.manifest.entries()]
            entries += [e for e in newer.values() if (self.path / e["file"]).is_file()]
            self.manifest.rewrite(one_per_file(entries))
        journal.unlink()


def _alive(lock_path: Path) -> bool:
    """True while the writer holding `lock_path` (`claims/<host>-<pid>-<token>.lock`) lives: the kernel frees a
    dead process's lock; on this host a process that is gone is dead even where locks are emulated by files."""
    if not lock_path.exists() or _gone(lock_path):
        return False
    probe = FileLock(lock_path, thread_local=False)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()
    return False


def _gone(lock_path: Path) -> bool:
    """True if the writer named by `lock_path` ran on this host and its process no longer exists."""
    host, pid, _ = (lock_path.stem.rsplit("-", 2) + ["", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _number(name: str) -> int:
    m = _NUMBERED.match(name)
    return int(m.group(1)) if m else -1
