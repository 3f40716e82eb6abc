"""The baseline file of ``bnaudit check``: a fingerprint sealed whole, and optionally signed.

A **baseline** is a fingerprint file (``bnaudit.fingerprint/3``, or /2 or /1 from an older
bnaudit; so ``bnaudit compare`` reads it as is) with one more block, ``extra["baseline"]``::

    {"schema": "bnaudit.baseline/2", "bnaudit": VERSION, "created": ISO-8601 UTC,
     "updated": ISO-8601 UTC or null, "made_from": NAME, "sha256": HEX, "signature": HEX or null}

``sha256`` (the **seal**) is ``fileio.canonical_sha256`` of the whole document but the two
seal fields ``sha256`` and ``signature``: the fingerprint and the block's own metadata
(when, from what, by which bnaudit).  The seal is checked first and on its own, so that
an edited baseline is refused as a baseline ("edited or corrupt baseline") whatever was
edited: the exact parameters the ulps and rel policies read, the losses, the
environment, the creation time.

The seal is a plain hash: whoever edits a baseline can recompute it.  **Signing** closes
that: with a key (``BNAUDIT_SIGNING_KEY``, a CI secret, read by ``envinfo`` and passed
in by the caller), ``signature`` is HMAC-SHA256 keyed with the key's UTF-8 bytes over
the ASCII hex ``canonical_sha256`` of the whole document but ``signature`` (so over the
seal too), and a load with a key refuses an unsigned baseline or a wrong signature.
Without a key a signed baseline loads, its signature unchecked (``Signature.UNCHECKED``:
the caller says so).

Schema 1 sealed everything but its own block; it is refused with the command that
re-seals it.  Loading, making and replacing baselines is all here; what a check does
with one is ``bnaudit.check``.  No torch, no mpmath, no runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

from bnaudit import compare, fileio, record
from bnaudit._version import __version__
from bnaudit.blocks import EnsembleOutcomes
from bnaudit.errors import InputError, MismatchError, OutputError, UsageError
from bnaudit.record import Fingerprint
from bnaudit.spec import ExperimentSpec

BASELINE_SCHEMA = "bnaudit.baseline/2"
"""2: the seal covers the baseline block's own fields; an optional HMAC-SHA256 signature."""
OLD_BASELINE_SCHEMAS = ("bnaudit.baseline/1",)
SEAL_FIELDS = ("sha256", "signature")
"""The block's fields that the seal does not cover (the seal itself, and the signature over the seal)."""
KEY_VARIABLE = "BNAUDIT_SIGNING_KEY"
MIN_KEY_BYTES = 32
"""Shortest signing key accepted: the signed document is public, so a short key could be guessed offline."""
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TEXT_FIELDS = (("created", False), ("updated", True), ("made_from", False))
"""The block's text fields, and whether each may be null."""


class Signature(enum.Enum):
    """What is known of a loaded baseline's signature."""

    UNSIGNED = "unsigned"
    """No signature (loaded without a key: a key refuses it)."""
    VERIFIED = "verified"
    """Signed, and the signature matches the key given."""
    UNCHECKED = "unchecked"
    """Signed, but loaded without a key: the signature could not be checked."""


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A loaded, verified baseline file."""

    path: str
    """Where it was loaded from."""
    fingerprint: Fingerprint
    """The run it vouches for."""
    created: str
    """When it was first written (UTC, ISO 8601)."""
    updated: str | None
    """When it was last replaced by ``baseline update``, or None."""
    made_from: str
    """Name of the record or fingerprint it was made from (no path)."""
    signature: Signature = Signature.UNSIGNED
    """Unsigned, signed and verified against the key, or signed but unchecked (no key)."""
    ensemble: EnsembleOutcomes | None = None
    """An ensemble baseline's outcomes over seeds (``check --tolerance dist:RATE``); None: one run's baseline."""

    @property
    def dtype(self) -> str:
        """The run dtype of its configuration (float32, float64, bfloat16, bf16-mixed)."""
        return self.fingerprint.controls.dtype


def source_name(source: str) -> str:
    """A short name for where a run came from: its record folder, or the folder of its fingerprint file."""
    path = Path(source)
    if path.name in ("fingerprint.json", "record.json") and path.parent.name:
        return path.parent.name
    return path.name or source


def validate_key(key: bytes | None) -> bytes | None:
    """The signing key as given, refused (UsageError) when too short to be a secret."""
    if key is not None and len(key) < MIN_KEY_BYTES:
        raise UsageError(f"{KEY_VARIABLE} is {len(key)} bytes; use a random key of at least {MIN_KEY_BYTES} "
                         "(python3 -c 'import secrets; print(secrets.token_hex(32))')")
    return key


# --------------------------------------------------------------------------- seal and signature

def _without(raw: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """The document with these fields left out of its baseline block (a copy; the input is not changed)."""
    extra = raw.get("extra")
    block = extra.get("baseline") if isinstance(extra, dict) else None
    if not isinstance(extra, dict) or not isinstance(block, dict):
        return raw
    return {**raw, "extra": {**extra, "baseline": {k: v for k, v in block.items() if k not in fields}}}


def seal(raw: dict[str, Any]) -> str:
    """The baseline's sha256: the canonical hash of the whole document but the seal fields."""
    return fileio.canonical_sha256(_without(raw, SEAL_FIELDS))


def sign(raw: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 under ``key`` of the canonical hash of the whole document but its signature (seal included)."""
    message = fileio.canonical_sha256(_without(raw, ("signature",))).encode("ascii")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _signature_state(raw: dict[str, Any], found: str | None, key: bytes | None, where: str) -> Signature:
    """Check the signature against the key (InputError when a key is given and it does not match)."""
    if key is None:
        return Signature.UNSIGNED if found is None else Signature.UNCHECKED
    if found is None:
        raise InputError(f"{where}: not signed, and {KEY_VARIABLE} is set: check accepts only baselines signed "
                         f"with that key (sign it where the key is kept: bnaudit baseline create or update "
                         f"with {KEY_VARIABLE} set)")
    if not hmac.compare_digest(found, sign(raw, key)):
        raise InputError(f"{where}: signature does not match {KEY_VARIABLE} (signed with another key, or edited "
                         "and re-sealed without it)")
    return Signature.VERIFIED


def _escaped(key: bytes) -> str:
    """The key as it would appear inside a JSON string."""
    return json.dumps(key.decode("utf-8", "replace"), ensure_ascii=False)[1:-1]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------- reading

def _block(raw: dict[str, Any], where: str, name: str) -> dict[str, Any]:
    """The baseline block, of the current schema (InputError naming what is wrong)."""
    extra = raw.get("extra")
    block = extra.get("baseline") if isinstance(extra, dict) else None
    if block is None:
        if raw.get("schema") in (*record.FINGERPRINT_SCHEMAS, *record.RECORD_SCHEMAS):
            raise InputError(f"{where}: a fingerprint, not a baseline; make one with "
                             f"bnaudit baseline create --record {name} --out FILE")
        raise InputError(f"{where}: not a bnaudit baseline (no baseline block)")
    found = block.get("schema") if isinstance(block, dict) else None
    if found in OLD_BASELINE_SCHEMAS:
        raise InputError(f"{where}: a {found} baseline, whose seal leaves out its own created, updated and "
                         f"made_from; re-seal it: bnaudit baseline create --force --record {where} --out {where}")
    if not isinstance(block, dict) or found != BASELINE_SCHEMA:
        raise InputError(f"{where}: baseline schema {str(found)[:40]!r} is not {BASELINE_SCHEMA}")
    return block


def _block_fields(raw: dict[str, Any], where: str, name: str) -> dict[str, str | None]:
    """The baseline block's fields, validated (InputError naming what is wrong)."""
    block = _block(raw, where, name)
    fields: dict[str, str | None] = {}
    for key, optional in _TEXT_FIELDS:
        value = block.get(key)
        if value is None and optional:
            fields[key] = None
        elif not isinstance(value, str) or len(value) > 300:
            raise InputError(f"{where}: baseline field {key!r} is missing or malformed")
        else:
            fields[key] = value
    for key in SEAL_FIELDS:
        value = block.get(key)
        if not (value is None and key == "signature") and not (isinstance(value, str) and _HEX64.fullmatch(value)):
            raise InputError(f"{where}: baseline field {key!r} is missing or malformed")
        fields[key] = value
    return fields


def load_baseline(path: Path | str, *, key: bytes | None) -> Baseline:
    """Load a baseline file: its block, its seal, its signature (with a key), then the fingerprint field by field.

    ``key``: the signing key (``BNAUDIT_SIGNING_KEY``), or None to load without checking a signature.
    """
    path = Path(path)
    where = str(path)
    raw = fileio.read_json(path, "baseline")
    fields = _block_fields(raw, where, path.name)
    if seal(raw) != fields["sha256"]:
        raise InputError(f"{where}: content does not match its sha256 (edited or corrupt baseline)")
    signature = _signature_state(raw, fields["signature"], key, where)
    if raw.get("schema") not in record.FINGERPRINT_SCHEMAS:
        raise InputError(f"{where}: schema {str(raw.get('schema'))[:40]!r} is not {record.FINGERPRINT_SCHEMA}")
    ensemble = raw["extra"]["baseline"].get("ensemble")
    return Baseline(path=where, fingerprint=record.read_fingerprint(path), created=str(fields["created"]),
                    updated=fields["updated"], made_from=str(fields["made_from"]), signature=signature,
                    ensemble=None if ensemble is None else EnsembleOutcomes.from_json(ensemble, where))


def open_for_update(out: Path, *, force: bool, key: bytes | None) -> Baseline | None:
    """The baseline ``baseline update`` is about to replace; None if it is unusable and ``force`` is given.

    Unusable: unreadable, edited, of an old schema, or (with a key) unsigned or wrongly
    signed.  Without a key, a signed baseline is not replaced by an unsigned one unless forced.
    """
    if not out.exists():
        raise InputError(f"{out}: no baseline to update; make one with bnaudit baseline create")
    try:
        old = load_baseline(out, key=key)
    except InputError as exc:
        if not force:
            raise InputError(f"{exc.message} (pass --force to replace it)") from None
        return None
    if old.signature is Signature.UNCHECKED and not force:
        raise InputError(f"{out} is signed; set {KEY_VARIABLE} to update it, or pass --force to replace it "
                         "with an unsigned baseline")
    return old


# --------------------------------------------------------------------------- same experiment

def experiment_differences(baseline: Fingerprint, *, spec: ExperimentSpec, frozen: str | None = None,
                           dtype: str | None = None) -> list[str]:
    """What makes a run of ``spec`` (frozen inputs, run dtype: when given) another experiment than a baseline's.

    Empty: the same experiment.  A run of another length is the same experiment (a
    check compares a prefix; an update may lengthen a baseline).
    """
    out = compare.experiment_differences(baseline.spec, spec, baseline.frozen, frozen)
    if dtype is not None and dtype != baseline.controls.dtype:
        out.append(f"different run dtype ({baseline.controls.dtype} vs {dtype})")
    return out


def refuse_another_experiment(out: Path, old: Baseline, *, spec: ExperimentSpec, frozen: str | None = None,
                              dtype: str | None = None, force: bool = False) -> None:
    """``baseline update``'s refusal (MismatchError) to replace a baseline with another experiment's, unless forced."""
    problems = experiment_differences(old.fingerprint, spec=spec, frozen=frozen, dtype=dtype)
    if problems and not force:
        raise MismatchError(f"{out} is a baseline of another experiment ({'; '.join(problems)}); "
                            "pass --force to replace it")


# --------------------------------------------------------------------------- writing

def _source_fingerprint_file(source: Path) -> Path:
    """The fingerprint JSON of a record folder, record.json or fingerprint file."""
    if source.is_dir():
        return source / "fingerprint.json"
    if source.name == "record.json":
        return source.parent / "fingerprint.json"
    return source


def baseline_dict(source: Path, *, created: str | None = None, updated: str | None = None,
                  key: bytes | None = None, ensemble: EnsembleOutcomes | None = None) -> dict[str, Any]:
    """The baseline JSON for a record folder or fingerprint file (verified before it is copied), signed with ``key``;
    ``ensemble``: the outcomes of the ensemble the run is one seed of, sealed with it.

    A baseline file is a fingerprint file too: given as the source, its fingerprint is
    verified (content_sha256, digest) and sealed anew, its old block dropped.
    """
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    fp_file = _source_fingerprint_file(source)
    if fp_file != source:  # a record: verify every array and the record's digest as well
        full = record.load(source)
        if record.read_fingerprint(fp_file).digest != full.digest:
            raise InputError(f"{fp_file}: does not match its record (edited or corrupt)")
    raw = fileio.read_json(fp_file, "fingerprint")
    if raw.get("schema") not in record.FINGERPRINT_SCHEMAS:
        raise InputError(f"{fp_file}: schema {str(raw.get('schema'))[:40]!r} is not {record.FINGERPRINT_SCHEMA}")
    record.read_fingerprint(fp_file)  # field by field, digest recomputed
    if key is not None and _escaped(key) in json.dumps(raw, ensure_ascii=False):
        raise InputError(f"{fp_file}: holds the value of {KEY_VARIABLE} (a run made with the key in its "
                         "environment records it); refusing to publish it in a baseline: run again without it, "
                         "and replace the key if the record was shared")
    extra = raw.get("extra")
    body = {k: v for k, v in extra.items() if k != "baseline"} if isinstance(extra, dict) else {}
    block = {"schema": BASELINE_SCHEMA, "bnaudit": __version__, "created": created or _now(),
             "updated": updated, "made_from": source_name(str(fp_file))[:200],
             **({"ensemble": ensemble.to_json()} if ensemble is not None else {})}
    doc = {**raw, "extra": {**body, "baseline": block}}
    block["sha256"] = seal(doc)
    block["signature"] = None if key is None else sign(doc, key)
    return doc


def write_baseline(out: Path, source: Path, *, update: bool, force: bool = False,
                   key: bytes | None = None, ensemble: EnsembleOutcomes | None = None) -> Baseline:
    """Write ``out`` as the baseline of ``source`` atomically, signed with ``key`` when one is given.

    create (update=False) refuses an existing file unless forced.  update refuses a missing
    file, and one that is unusable (``open_for_update``) or of another experiment (spec,
    frozen inputs, run dtype) unless forced; it keeps the original creation time.
    """
    out = Path(out)
    created: str | None = None
    updated: str | None = None
    if update:
        old = open_for_update(out, force=force, key=key)
        new = record.load(_source_fingerprint_file(Path(source)))
        if old is not None and old.ensemble is not None and ensemble is None:
            raise UsageError(f"{out} is an ensemble baseline ({len(old.ensemble.seeds)} seeds); one run does not "
                             "replace it: remake it with bnaudit ensemble ... --baseline-out FILE --force")
        if old is not None:
            refuse_another_experiment(out, old, spec=new.spec, frozen=new.frozen, dtype=new.controls.dtype,
                                      force=force)
            created = old.created
        updated = _now()
    elif out.exists() and not force:
        raise OutputError(f"{out} already exists; use bnaudit baseline update, or --force")
    doc = baseline_dict(Path(source), created=created, updated=updated, key=key, ensemble=ensemble)
    fileio.write_text_atomic(out, fileio.dumps(doc))
    return load_baseline(out, key=key)
