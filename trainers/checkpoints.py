"""Complete checkpoints: a `checkpoint-N` folder counts only once every file in it is written and synced.

Why a completion marker and not a temporary name + rename: the stock `Trainer._save_checkpoint` writes straight
into `output_dir/checkpoint-N` (model, optimizer, scheduler, RNG state, trainer_state.json), DeepSpeed writes
each rank's optimizer shards there too, and `on_save` callbacks (e.g. the data-state files) find the folder by
that name. Redirecting all of them to a temporary folder would mean re-implementing `_save_checkpoint`. A
marker written after all of them works with the stock code on any number of ranks:

1. every rank runs `_save_checkpoint` and every `on_save` callback;
2. `CompleteCheckpointCallback.on_save`, appended LAST to the trainer's callbacks, fsyncs the folder's files
   (the local main process of each node, so the shards other ranks wrote are synced too), then waits for all
   ranks (`accelerator.wait_for_everyone`);
3. the main process writes `checkpoint_complete.json` (the step and every file's size) to a temporary name,
   fsyncs it, renames it into place and fsyncs the folder: the marker exists only complete, and only after
   everything else is on disk.

A SIGKILL or a full disk before step 3 leaves a folder without a marker, which `--resume_from_checkpoint last`
passes over (with a warning naming it) and which an explicit `--resume_from_checkpoint` refuses. A marker whose
listed files are missing or have another size (a truncated copy) does not count either.

Rotation (`--save_total_limit`) is taken over from the Trainer: transformers deletes old checkpoints inside
`_save_checkpoint`, before the new one is complete, and counts incomplete folders, so a kill during a save
with `--save_total_limit 1` left nothing to resume from. Here rotation runs after the marker is written,
counts complete checkpoints only, and never deletes the newest complete one (nor the best one).

A save that rewrites an existing `checkpoint-N` (a run resumed from an older checkpoint) first removes that
folder's old marker, at `on_step_end` / `on_epoch_end` where the Trainer has decided to save (save strategies
"steps" and "epoch"; "best" decides after evaluation, so a rewritten folder keeps its old marker until the
new one replaces it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(folder) -> int | None:
    """N of a `checkpoint-N` folder name, else None."""
    match = _CHECKPOINT_RE.match(Path(folder).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, oldest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def incomplete_reason(folder) -> str | None:
    """None when `folder` is a complete checkpoint, else why not (naming the marker or the file)."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} (the save did not finish)"
    try:
        content = json.loads(marker.read_text())
        files = content["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {marker}: {err}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is listed in {COMPLETE_MARKER} but missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {COMPLETE_MARKER} says {size}"
    return None


def is_complete(folder) -> bool:
    return incomplete_reason(folder) is None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder) -> None:
    """fsync every file and directory under `folder` (data and directory entries reach the disk)."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(root, name))
        _fsync_path(Path(root))


def _file_sizes(folder: Path) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root, name)
            rel = path.relative_to(folder).as_posix()
            if rel != COMPLETE_MARKER and not rel.startswith(f".{COMPLETE_MARKER}"):
                sizes[rel] = path.stat().st_size
    return dict(sorted(sizes.items()))


def mark_complete(folder, step: int) -> Path:
    """Write `folder/checkpoint_complete.json` atomically (temporary name, fsync, rename, fsync the folder).
    Call it only after every file of the checkpoint is written and synced."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    tmp = folder / f".{COMPLETE_MARKER}.tmp"
    content = {"global_step": step, "files": _file_sizes(folder)}
    with open(tmp, "w") as f:
        f.write(json.dumps(content, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)
    _fsync_path(folder)
    return marker


def unmark(folder) -> bool:
    """Remove the marker of a folder about to be rewritten; True when there was one."""
    marker = Path(folder) / COMPLETE_MARKER
    if not marker.exists():
        return False
    marker.unlink()
    _fsync_path(Path(folder))
    return True


def last_complete_checkpoint(output_dir) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint of `output_dir` (None if there is none) and the incomplete folders newer
    than it, each with why it does not count."""
    passed_over = []
    for folder in reversed(list_checkpoints(output_dir)):
        reason = incomplete_reason(folder)
        if reason is None:
            return folder, passed_over
        passed_over.append((folder, reason))
    return None, passed_over


def resolve_resume(value: str | None, output_dir, prog: str) -> str | None:
    """--resume_from_checkpoint: `last` -> the newest complete checkpoint of `output_dir` (warning about every
    incomplete one passed over); a path -> itself if complete. SystemExit otherwise."""
    if not value:
        return None
    if value == "last":
        found, passed_over = last_complete_checkpoint(output_dir)
        skipped = "; ".join(f"{folder} ({reason})" for folder, reason in passed_over)
        if found is None:
            if passed_over:
                raise SystemExit(f"{prog}: --resume_from_checkpoint last: no complete checkpoint in {output_dir}; "
                                 f"incomplete: {skipped}")
            raise SystemExit(f"{prog}: --resume_from_checkpoint last: no checkpoint in {output_dir}")
        if passed_over:
            logger.warning("--resume_from_checkpoint last: resuming from %s, passing over incomplete %s",
                           found, skipped)
        return str(found)
    folder = Path(value)
    if not folder.is_dir():
        raise SystemExit(f"{prog}: --resume_from_checkpoint {value}: no such folder")
    reason = incomplete_reason(folder)
    if reason is not None:
        raise SystemExit(
            f"{prog}: --resume_from_checkpoint {value} is not a complete checkpoint: {reason}. "
            f"{COMPLETE_MARKER} is written last, after every file of the save; without it the folder was being "
            f"written when the run stopped (or predates completion markers). Use `last` for the newest complete one."
        )
    return str(folder)


def rotate(output_dir, save_total_limit: int | None, newest: Path, best: str | None = None) -> list[Path]:
    """Keep the `save_total_limit` newest complete checkpoints, `newest` (just completed) and `best` always;
    delete older complete ones and the incomplete folders older than `newest` (leftovers of killed saves,
    never resumable). Incomplete folders newer than `newest` are left: the run rewrites them. Returns the
    deleted folders."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    newest_step = checkpoint_step(newest)
    protected = {Path(newest).resolve()} | ({Path(best).resolve()} if best else set())
    complete, stale = [], []
    for folder in list_checkpoints(output_dir):
        if checkpoint_step(folder) > newest_step:
            continue
        (complete if is_complete(folder) else stale).append(folder)
    keep = set(complete[-save_total_limit:]) | {f for f in complete if f.resolve() in protected}
    deleted = [f for f in complete if f not in keep] + [f for f in stale if f.resolve() not in protected]
    for folder in deleted:
        logger.info("Deleting checkpoint %s (--save_total_limit %d)", folder, save_total_limit)
        shutil.rmtree(folder, ignore_errors=True)
    return deleted


class CompleteCheckpointCallback(TrainerCallback):
    """Marks each `checkpoint-N` complete after every rank and every other `on_save` callback is done with it,
    and rotates checkpoints afterwards (see the module docstring). Attach with `attach(trainer)` as the
    trainer's LAST callback."""

    def __init__(self, trainer, save_total_limit: int | None):
        self.trainer = trainer
        self.save_total_limit = save_total_limit

    @classmethod
    def attach(cls, trainer) -> CompleteCheckpointCallback:
        """Append the callback last and take `save_total_limit` over from the Trainer (whose own rotation runs
        before the checkpoint is complete)."""
        callback = cls(trainer, trainer.args.save_total_limit)
        trainer.args.save_total_limit = None
        trainer.add_callback(callback)
        return callback

    def _folder(self, args, state) -> Path:
        return Path(args.output_dir, f"checkpoint-{state.global_step}")

    def on_train_begin(self, args, state, control, **kwargs):
        callbacks = self.trainer.callback_handler.callbacks
        if callbacks[-1] is not self:  # another on_save after ours could write into a folder marked complete
            after = [type(c).__name__ for c in callbacks[callbacks.index(self) + 1:]]
            raise RuntimeError(f"CompleteCheckpointCallback must be the trainer's last callback; after it: {after}")

    def _unmark_before_save(self, args, state, control):
        if not control.should_save:  # the same on every rank
            return
        if args.should_save and unmark(self._folder(args, state)):
            logger.info("Rewriting %s: its old %s is removed first", self._folder(args, state), COMPLETE_MARKER)
        self.trainer.accelerator.wait_for_everyone()  # no rank writes into the folder while it is still marked

    def on_step_end(self, args, state, control, **kwargs):
        self._unmark_before_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._unmark_before_save(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        folder = self._folder(args, state)
        if state.is_local_process_zero and folder.is_dir():
            fsync_tree(folder)
        self.trainer.accelerator.wait_for_everyone()  # every rank's files and on_save callbacks are done
        if args.should_save:
            mark_complete(folder, state.global_step)
            rotate(args.output_dir, self.save_total_limit, folder, state.best_model_checkpoint)
        self.trainer.accelerator.wait_for_everyone()  # no rank goes on while the folder is being marked


__all__ = ["COMPLETE_MARKER", "CompleteCheckpointCallback", "checkpoint_step", "fsync_tree", "incomplete_reason",
           "is_complete", "last_complete_checkpoint", "list_checkpoints", "mark_complete", "resolve_resume", "rotate",
           "unmark"]
