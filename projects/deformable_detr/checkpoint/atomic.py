"""Checkpoints that survive a job killed at any moment."""

import glob
import logging
import os
import pickle
import tempfile
import zipfile

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .layout import upgrade_state_dict


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, not a checkpoint, ...)."""


def atomic_write(path, write):
    """Calls ``write(file)`` on a temporary file beside ``path``, then renames it onto ``path``.

    A reader sees either the old file or the complete new one, never a partial write.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` whose files and ``last_checkpoint`` tag are written
    atomically, so ``--resume`` after a SIGKILL (even mid-save) starts from the last complete
    checkpoint, and whose unreadable files raise :class:`CorruptCheckpointError`.

    A checkpoint damaged after it was written (a truncated copy, a full disk) does not end a
    resume: :meth:`resume_or_load` warns and loads the newest readable ``model_*.pth`` of
    ``save_dir`` instead, and raises :class:`CorruptCheckpointError` when none is readable.
    Checkpoints of earlier versions of the plugin load through :func:`upgrade_state_dict`.
    """

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        tag_file = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(tag_file, lambda f: f.write(last_filename_basename.encode()))

    def resume_or_load(self, path, *, resume=True):
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        last = self.get_checkpoint_file()
        # Newest first; PeriodicCheckpointer names them model_<iter>.pth and model_final.pth.
        older = sorted(
            (f for f in glob.glob(os.path.join(self.save_dir, "model_*.pth")) if f != last),
            key=os.path.getmtime,
            reverse=True,
        )
        for candidate in [last, *older]:
            try:
                return self.load(candidate)
            except CorruptCheckpointError as error:
                logging.getLogger(__name__).warning(f"{error} Trying an older checkpoint.")
        raise CorruptCheckpointError(
            f"No readable checkpoint in {self.save_dir!r} to resume from (tried {last!r} and "
            f"{len(older)} older ones); train without --resume to start from MODEL.WEIGHTS."
        )

    def _load_model(self, checkpoint):
        checkpoint["model"] = upgrade_state_dict(checkpoint["model"])
        return super()._load_model(checkpoint)

    def load(self, path, *args, **kwargs):
        try:
            return super().load(path, *args, **kwargs)
        finally:
            # DetectionCheckpointer.load asserts this is None and leaves it set when reading fails.
            self._parsed_url_during_load = None

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
            raise CorruptCheckpointError(
                f"Cannot read checkpoint {filename!r}: {error}. The file is truncated or not a "
                "checkpoint; delete it or point MODEL.WEIGHTS / last_checkpoint to a good one."
            ) from error
