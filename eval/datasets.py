"""Multi-hop QA records (MuSiQue-Ans schema) and loaders with precise error messages.

Example:
    >>> from eval.datasets import load_dataset_by_name, load_musique
    >>> test = load_musique(split="test", hops=2)          # MuSiQue-Ans dev, 2-hop, test half
    >>> rec = test[0]
    >>> rec.hops, rec.golds[:1], rec.question_decomposition[1].question  # doctest: +SKIP
    (2, ('Miquette Giraudy',), '#1 >> spouse')
    >>> twohop_dev = load_dataset_by_name("twohop", split="dev")

Everything is a :class:`QARecord`: the MuSiQue-Ans fields (``id``,
``question``, ``question_decomposition``, ``answer``, ``answer_aliases``,
``answerable``) plus a free ``meta`` dict (split, relation chain, spans...).
Files are JSONL (one record per line) or JSON (a list, or a dict whose
``"data"`` is a list). A malformed record raises :class:`DatasetError` naming
the file, the 1-based line (JSONL) or the list index (JSON, ``[i]`` 0-based)
and the offending field.

MuSiQue split rule (``eval/data/MUSIQUE.md``): a record is in
**calib** when ``int(sha256(id).hexdigest(), 16) % 2 == 0``, else in **test**.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from eval.dataset_registry import DatasetSpec, datasets, register_dataset
from eval.records import DatasetError, DecompStep, QARecord, _parse_record, _type_name

__all__ = [
    "DatasetError",
    "DecompStep",
    "QARecord",
    "load_jsonl",
    "load_json",
    "load_records",
    "musique_split",
    "default_musique_path",
    "bundled_musique_path",
    "Selection",
    "select_records",
    "select_musique",
    "load_musique",
    "load_hf_musique",
    "load_dataset_by_name",
    "MUSIQUE_FILENAME",
    "MUSIQUE_ENV",
]

MUSIQUE_FILENAME = "musique_ans_v1.0_dev.jsonl"
BUNDLED_MUSIQUE = MUSIQUE_FILENAME + ".gz"
MUSIQUE_ENV = "AUTOPATCH_MUSIQUE_DIR"
HF_PREFIX = "hf:"
MUSIQUE_SPLITS = ("calib", "test")


def _check_unique(records: Iterable[tuple[str, QARecord]]) -> list[QARecord]:
    seen: dict[str, str] = {}
    out: list[QARecord] = []
    for where, rec in records:
        if rec.id in seen:
            raise DatasetError(f"{where}: field 'id' duplicates id {rec.id!r} (first seen at {seen[rec.id]})")
        seen[rec.id] = where
        out.append(rec)
    return out


# --------------------------------------------------------------------------- files


def _open_text(path: Path):
    """A text handle on ``path``, decompressing ``.gz`` files."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _read_text(path: Path) -> str:
    try:
        with _open_text(path) as fh:
            return fh.read()
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path.name}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"{path.name}: cannot be read ({err})") from None


def _data_suffix(path: Path) -> str:
    """``.jsonl`` for ``x.jsonl`` and ``x.jsonl.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _iter_jsonl(path: Path) -> Iterator[tuple[str, QARecord]]:
    name = path.name
    lineno = 0
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{name} line {lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DatasetError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
                except RecursionError:
                    raise DatasetError(f"{where}: JSON nested too deeply to be a record") from None
                yield where, _parse_record(obj, where)
    except UnicodeDecodeError as err:
        raise DatasetError(f"{name} line {lineno + 1}: not UTF-8 text ({err.reason} at byte {err.start} of the "
                           "line); save the file as UTF-8") from None
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{name} line {lineno + 1}: cannot be read ({err})") from None


def _open_checked(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: no such file")
    return p


def load_jsonl(path: str | os.PathLike[str]) -> list[QARecord]:
    """``load_jsonl("musique_ans_v1.0_dev.jsonl")``: one record per non-blank line."""
    return _check_unique(_iter_jsonl(_open_checked(path)))


def _records_from_list(items: list[Any], name: str, prefix: str) -> list[QARecord]:
    pairs = ((f"{name} {prefix}[{i}]", _parse_record(obj, f"{name} {prefix}[{i}]")) for i, obj in enumerate(items))
    return _check_unique(pairs)


def load_json(path: str | os.PathLike[str]) -> list[QARecord]:
    """``load_json("dev.json")``: a JSON list of records, or ``{"data": [records...]}``."""
    p = _open_checked(path)
    try:
        data = json.loads(_read_text(p))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{p.name} line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise DatasetError(f"{p.name}: JSON nested too deeply to be a dataset") from None
    if isinstance(data, list):
        return _records_from_list(data, p.name, "")
    if isinstance(data, dict) and "data" in data:
        if not isinstance(data["data"], list):
            raise DatasetError(f"{p.name}: field 'data' must be a list, got {_type_name(data['data'])}")
        return _records_from_list(data["data"], p.name, "data")
    raise DatasetError(f"{p.name}: top level must be a list of records or an object with a 'data' list")


def load_records(path: str | os.PathLike[str]) -> list[QARecord]:
    """``load_records(path)``: ``.jsonl``/``.ndjson`` -> :func:`load_jsonl`, ``.json`` -> :func:`load_json`.

    Either may be gzipped (``.jsonl.gz``). A ``.json`` file that is really JSON
    Lines (several top-level values) is read as JSONL.
    """
    p = _open_checked(path)
    suffix = _data_suffix(p)
    if suffix in (".jsonl", ".ndjson"):
        return load_jsonl(p)
    if suffix == ".json":
        try:
            json.loads(_read_text(p))
        except json.JSONDecodeError as err:
            if err.msg == "Extra data":
                return load_jsonl(p)
        except RecursionError:
            pass  # load_json names it
        return load_json(p)
    raise DatasetError(f"{p.name}: unknown dataset format {suffix or '(no extension)'!r}; use .jsonl or .json")


# --------------------------------------------------------------------------- MuSiQue


def musique_split(record_id: str) -> Literal["calib", "test"]:
    """``musique_split("2hop__460946_294723") in ("calib", "test")``: the README's sha256 parity rule."""
    return "calib" if int(hashlib.sha256(record_id.encode()).hexdigest(), 16) % 2 == 0 else "test"


def bundled_musique_path() -> Path:
    """The MuSiQue-Ans v1.0 dev questions shipped as package data (CC BY 4.0, see ``eval/data/MUSIQUE.md``)."""
    return Path(__file__).resolve().parent / "data" / BUNDLED_MUSIQUE


def default_musique_path() -> Path:
    """``default_musique_path()``: ``$AUTOPATCH_MUSIQUE_DIR`` when set, else the bundled copy.

    ``$AUTOPATCH_MUSIQUE_DIR`` may name the directory holding
    ``musique_ans_v1.0_dev.jsonl`` or the file itself.
    """
    env = os.environ.get(MUSIQUE_ENV)
    if env:
        p = Path(env).expanduser()
        candidate = p / MUSIQUE_FILENAME if p.is_dir() else p
        if candidate.is_file():
            return candidate
        raise DatasetError(
            f"{MUSIQUE_ENV}={env!r} does not contain {MUSIQUE_FILENAME}; "
            f"fix or unset the variable (the bundled copy is used when it is unset), "
            f"or pass --dataset PATH to a MuSiQue .jsonl file"
        )
    bundled = bundled_musique_path()
    if not bundled.is_file():
        raise DatasetError(f"the bundled MuSiQue file {bundled} is missing (a broken install?); reinstall autopatch, "
                           f"pass --dataset PATH to a MuSiQue .jsonl file, or set {MUSIQUE_ENV}")
    return bundled


def check_split(split: str | None, allowed: tuple[str, ...], what: str) -> None:
    if split is not None and split not in allowed:
        raise DatasetError(f"unknown split {split!r} for {what}; choose one of {', '.join(allowed)} (or None for all)")


def load_musique(
    path: str | os.PathLike[str] | None = None,
    *,
    split: str | None = None,
    hops: int | None = None,
    answerable_only: bool = True,
) -> list[QARecord]:
    """``load_musique(split="calib", hops=2)``: MuSiQue-Ans records, filtered; ``meta["split"]`` is set.

    ``split`` is "calib", "test" or None (all); ``hops`` keeps records with
    exactly that many decomposition steps.
    """
    return select_musique(path, split=split, hops=hops, answerable_only=answerable_only)[0]


def select_musique(
    path: str | os.PathLike[str] | None = None,
    *,
    split: str | None = None,
    hops: int | None = None,
    answerable_only: bool = True,
) -> tuple[list[QARecord], Selection]:
    """:func:`load_musique`'s records and a :class:`Selection` saying what was filtered and why."""
    check_split(split, MUSIQUE_SPLITS, "MuSiQue")
    everything = load_records(Path(path) if path is not None else default_musique_path())
    records = [r for r in everything if r.answerable or not answerable_only]
    kept, selection = filter_records(records, "musique", split, hops, lambda r: musique_split(r.id),
                              "the MuSiQue id-hash rule (calib: sha256(id) even)")
    if len(records) < len(everything):
        selection = Selection("musique", len(everything), selection.kept,
                              {"not answerable": len(everything) - len(records), **selection.dropped},
                              selection.split_rule)
    return [_with_meta(r, split=musique_split(r.id), source="musique") for r in kept], selection


def _with_meta(rec: QARecord, **extra: Any) -> QARecord:
    return dataclasses.replace(rec, meta={**rec.meta, **extra})


def _columns_to_rows(decomp: Any) -> Any:
    """HF ``Sequence`` features come back as a dict of lists; turn them into a list of dicts."""
    if isinstance(decomp, Mapping) and decomp and all(isinstance(v, list) for v in decomp.values()):
        keys = list(decomp)
        n = len(decomp[keys[0]])
        return [{k: decomp[k][i] for k in keys} for i in range(n)]
    return decomp


def load_hf_musique(name: str, split: str = "validation") -> list[QARecord]:
    """``load_hf_musique("<hub-id>", "validation")``: MuSiQue from the Hugging Face hub (needs network).

    Raises :class:`DatasetError` when ``datasets`` is missing or the hub
    cannot be reached, telling the user to pass a local file instead.
    """
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise DatasetError(f"the 'datasets' package is needed to load {name!r} from the hub ({err})") from None
    try:
        rows = load_dataset(name, split=split)
    except Exception as err:  # the hub client raises many unrelated types (HTTP, offline, missing repo)
        raise DatasetError(
            f"could not load {name!r} (split {split!r}) from the Hugging Face hub: {err}; "
            f"pass --dataset PATH to a local MuSiQue .jsonl file instead"
        ) from None
    out: list[QARecord] = []
    for i, row in enumerate(rows):
        obj = dict(row)
        if "question_decomposition" in obj:
            obj["question_decomposition"] = _columns_to_rows(obj["question_decomposition"])
        rec = _parse_record(obj, f"{name}[{split}] [{i}]")
        out.append(_with_meta(rec, split=musique_split(rec.id), source=name))
    return out


# --------------------------------------------------------------------------- dispatch


def _record_split(rec: QARecord) -> str:
    split = rec.meta.get("split")
    return split if isinstance(split, str) else musique_split(rec.id)


@dataclass(frozen=True)
class Selection:
    """What a dataset request kept, and what it filtered out and why (printed and stored with a run)."""

    source: str
    loaded: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    split_rule: str | None = None  # how a split was decided, when one was asked for

    def describe(self) -> str:
        """One line, e.g. ``"musique: 2417 records, kept 627 (dropped 1165: not 2 hops; 625: split is not test)"``."""
        text = f"{self.source}: {self.loaded} records, kept {self.kept}"
        if self.dropped:
            text += " (dropped " + "; ".join(f"{n}: {why}" for why, n in self.dropped.items()) + ")"
        if self.split_rule:
            text += f"; split by {self.split_rule}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "loaded": self.loaded, "kept": self.kept, "dropped": dict(self.dropped),
                "split_rule": self.split_rule}


def filter_records(records: list[QARecord], source: str, split: str | None, hops: int | None,
            split_of=_record_split, split_rule: str | None = None) -> tuple[list[QARecord], Selection]:
    dropped: dict[str, int] = {}
    kept = []
    for rec in records:
        if hops is not None and rec.hops != hops:
            reason = f"not {hops} hops"
        elif split is not None and split_of(rec) != split:
            reason = f"split is not {split}"
        else:
            kept.append(rec)
            continue
        dropped[reason] = dropped.get(reason, 0) + 1
    return kept, Selection(source, len(records), len(kept), dropped, split_rule if split is not None else None)


def _file_split_rule(records: Sequence[QARecord]) -> str:
    with_meta = sum(1 for r in records if isinstance(r.meta.get("split"), str))
    if with_meta == len(records):
        return "each record's meta.split"
    if with_meta == 0:
        return "the MuSiQue id-hash rule (no record has meta.split)"
    return f"meta.split where present ({with_meta} records), else the MuSiQue id-hash rule"


register_dataset(DatasetSpec("musique", "MuSiQue-Ans dev, bundled",
                             lambda split, hops: select_musique(split=split, hops=hops)))


def select_records(
    name_or_path: str | os.PathLike[str],
    split: str | None = None,
    hops: int | None = None,
) -> tuple[list[QARecord], Selection]:
    """Records of a named dataset or a file, and a :class:`Selection` saying what was filtered and why.

    * ``"twohop"``: the bundled generator (:func:`eval.twohop.generate_twohop`,
      splits train/dev/test, all 2-hop);
    * ``"musique"``: MuSiQue-Ans dev (bundled, or ``$AUTOPATCH_MUSIQUE_DIR``;
      splits calib/test by the id-hash rule);
    * ``"harm"``: the do-no-harm set (chat requests and single-hop questions), ``"handwritten"``: two-hop
      questions written by hand (:mod:`eval.realtraffic`; both split calib/test by the id-hash rule);
    * ``"hf:<hub-id>"``: MuSiQue from the Hugging Face hub, only when asked (needs network);
    * an existing file: :func:`load_records`, kept whole unless ``split`` is
      given (the record's ``meta["split"]`` when present, else the MuSiQue id
      rule, so MuSiQue files accept calib/test) or ``hops`` filters.

    ``hops=None`` keeps every hop count; an integer keeps the records with exactly that many, so ``hops=0`` keeps
    only requests without hops (the do-no-harm set's chat requests). The command line's ``--hops 0`` means "all"
    and is passed here as ``None``.
    """
    key = os.fspath(name_or_path)
    lowered = key.strip().lower()
    named = datasets()
    if lowered in named:
        return named[lowered].select(split, hops)
    if lowered.startswith(HF_PREFIX):
        records = load_hf_musique(key[len(HF_PREFIX):])
        return filter_records(records, key, split, hops, split_rule="the MuSiQue id-hash rule")
    if Path(key).expanduser().is_file():
        records = load_records(Path(key).expanduser())
        return filter_records(records, key, split, hops, split_rule=_file_split_rule(records))
    known = ", ".join(f"'{spec.name}' ({spec.description})" for spec in named.values())
    raise DatasetError(f"unknown dataset {key!r}: use {known}, 'hf:<hub-id>' (MuSiQue from the Hugging Face hub) "
                       f"or a path to an existing .jsonl/.json file")


def load_dataset_by_name(
    name_or_path: str | os.PathLike[str],
    split: str | None = None,
    hops: int | None = None,
) -> list[QARecord]:
    """``load_dataset_by_name("twohop", split="test")``, ``("musique", "calib", hops=2)`` or a file path.

    The records of :func:`select_records`, without its account of what was filtered.
    """
    return select_records(name_or_path, split, hops)[0]
