"""What a resumed compile checks against the store it continues: vanished inputs, and settings or identities
recorded by earlier versions of labelstore (accepted only where they describe the same labels)."""

from __future__ import annotations

from pathlib import Path

from labelstore.errors import ConfigMismatchError, InputDataError, LabelStoreError
from labelstore.teacher.inputs import Plan
from labelstore.teacher.model import legacy_teacher_fingerprint


def check_inputs_still_there(out, plan: Plan) -> None:
    """On resume: if the data changed because input files the store was compiled from vanished, name them.

    (The config check would refuse the resume anyway, but only as a changed data fingerprint.) Input files are
    read once, while planning: after that a compile runs from the plan's own copy of the tokens.
    """
    from labelstore.store.locations import read_store_config

    try:  # read_config refuses a FIFO, a folder or a link before reading a byte
        cfg = read_store_config(out)
        old_sha, old_files = cfg["compile_config"]["data"]["sha256"], list(cfg["runtime"]["data_files"])
    except (LabelStoreError, OSError, ValueError, KeyError, TypeError):
        return  # a new store, or a damaged config that the writer reports
    if old_sha == plan.fingerprint:
        return
    now = set(plan.files)
    gone = [f for f in old_files if f not in now and not f.startswith(("hf:", "<")) and not _exists(f)]
    if gone:
        raise InputDataError(
            f"{out} was compiled from input file(s) that no longer exist: {', '.join(gone[:5])}"
            f"{f' and {len(gone) - 5} more' if len(gone) > 5 else ''}. Restore them and rerun the same command to "
            "resume; committed shards are intact."
        )


def _exists(name: str) -> bool:
    """Whether the input file (or object, at a URL) named in a store's runtime metadata is still there. An object
    store that cannot answer (unreachable, access denied) counts as "there": this only names vanished inputs, the
    changed data fingerprint refuses the resume anyway."""
    from labelstore.store import objectstore

    if not objectstore.is_url(name):
        return Path(objectstore.local_path(name)).exists()
    try:
        fs, path = objectstore.filesystem(name)
        fs.invalidate_cache(path)
        objectstore.call(fs.info, path, url=name, action="checking input", passthrough=(FileNotFoundError,))
    except FileNotFoundError:
        return False
    except (LabelStoreError, ValueError):
        return True
    return True


# keys added to compile_config after stores were written without them: (key, runtime key that held it, or None)
LATER_KEYS = (("tokens_per_batch", "tokens_per_batch"), ("sampler_version", None))


def accept_older_config(out, meta: dict) -> None:
    """Resume a store written before a compared key existed: drop the key from ``meta`` if the store's own record
    agrees (for ``tokens_per_batch``, its ``runtime`` entry), else refuse naming the key."""
    from labelstore.store.locations import read_store_config

    try:
        old = read_store_config(out)
        old_cfg, old_runtime = old["compile_config"], old.get("runtime", {})
    except (LabelStoreError, OSError, ValueError, KeyError, TypeError):
        return  # a new store, or a damaged config that the writer reports
    for key, runtime_key in LATER_KEYS:
        if key in old_cfg or key not in meta["compile_config"]:
            continue
        now = meta["compile_config"].pop(key)
        if runtime_key is not None and old_runtime.get(runtime_key) != now:
            raise ConfigMismatchError(
                f"{out} was compiled with {runtime_key} {old_runtime.get(runtime_key)!r}, this run asks for {now!r}: "
                f"it changes the labels' numerics. Rerun with --{key.replace('_', '-')} "
                f"{old_runtime.get(runtime_key)} to resume; committed shards are intact."
            )


def accept_older_teacher_hash(out, meta: dict, model) -> None:
    """A store written by 0.1 recorded the teacher's sampled-values identity: when that identity matches this
    teacher, keep it (the resume goes on; the store's identity stays the weaker 0.1 one), else leave ours, which
    the writer then reports as a different teacher."""
    from labelstore.store.locations import read_store_config

    try:
        old = read_store_config(out)["teacher"]["hash"]
    except (LabelStoreError, OSError, ValueError, KeyError, TypeError):
        return
    if old != meta["teacher"]["hash"] and old == legacy_teacher_fingerprint(model):
        meta["teacher"]["hash"] = old
