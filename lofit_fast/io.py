"""Atomic file writes: nothing a user saved is ever left half-written.

Each file is written to a temporary name in the same directory, flushed to disk, then renamed over
the target in one step (`os.replace`), so a crash leaves either the old file or the new one.
"""

import contextlib
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; on a clean exit it replaces `path`, on an error it is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(descriptor)
    try:
        yield temporary
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        # mkstemp makes the file private (0600): give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def check_finite(tensors: dict, what: str, consequence: str) -> None:
    """ValueError naming each tensor of `tensors` with NaN or infinite values, and how many: f"{what} NaN or infinite
    values (...){consequence}"."""
    counts = {name: int((~tensor.isfinite()).sum()) for name, tensor in tensors.items()}
    bad = [f"{name!r}: {count} non-finite (NaN or inf) of {tensors[name].numel()}"
           for name, count in counts.items() if count]
    if bad:
        raise ValueError(f"{what} NaN or infinite values ({'; '.join(bad)}){consequence}")


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)


def write_config_and_weights(directory, config_name: str, config: dict, weights_name: str, tensors: dict,
                             metadata: dict) -> None:
    """Write `config` as strict JSON to `directory/config_name` and `tensors` as safetensors (with `metadata`)
    to `directory/weights_name`, creating `directory` if missing. Both are written in full to temporary files
    and flushed first; then the weights are renamed into place, and the config right after them, so a crash
    or an error leaves an earlier pair as it was and no temporary files behind. ValueError if the config
    holds a value that is not JSON (NaN and infinities included)."""
    import safetensors.torch

    directory = os.fspath(directory)  # atomic_path creates it when missing
    try:
        text = json.dumps(config, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_name} can hold only finite JSON values ({error})") from None
    with atomic_path(os.path.join(directory, config_name)) as config_temporary:
        with open(config_temporary, "w", encoding="utf-8") as file:
            file.write(text)
        with atomic_path(os.path.join(directory, weights_name)) as weights_temporary:
            safetensors.torch.save_file(tensors, weights_temporary, metadata=metadata)
        # The weights are in place; leaving the outer block puts the config beside them.
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    """Make renames in `directory` durable too (POSIX; a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
