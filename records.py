"""EPLB record files in sglang's formats, read as untrusted input: tensors and plain JSON only.

    {"logical_count": [S, L, E]}           load recorded over S steps (a dump; plan from it)
    {"physical_to_logical_map": [L, P]}    a placement (use it as is)

A dump also carries the placement its counts were recorded under, as LAST_MAP_KEY.
"""
from __future__ import annotations

import json
import os

import torch

__all__ = ["load_record", "save_record", "LAST_MAP_KEY"]

MAX_RECORD_BYTES = 1 << 30
MAX_RECORD_ELEMENTS = 1 << 28
MAX_RECORD_VALUE = 2 ** 53   # float64 counts exactly up to here; a larger "count" is not one
RECORD_KEYS = ("logical_count", "physical_to_logical_map")
# not "physical_to_logical_map": sglang's --init-expert-location would use that as the placement
LAST_MAP_KEY = "last_physical_to_logical_map"


def load_record(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an EPLB record: a .pt (torch.load weights_only=True), a .json file, or a JSON string.

    Returns {"logical_count": [S, L, E] float64} and/or {"physical_to_logical_map": [L, P] int64}
    (and LAST_MAP_KEY [L, P] int64 when present). Anything else (pickled objects, wrong types or
    shapes, NaN, negatives, huge values, oversize) raises ValueError naming the file and the problem.
    """
    text = str(source)
    inline = text.lstrip().startswith("{")
    try:
        return _checked_record(_parse_json(text) if inline else _read_file(text))
    except ValueError as error:
        raise ValueError(f"{'inline JSON record' if inline else f'record file {text!r}'}: {error}") from None


def _read_file(path: str):
    if not os.path.isfile(path):
        raise ValueError("no such file")
    if os.path.getsize(path) > MAX_RECORD_BYTES:
        raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
    if path.endswith(".json"):
        with open(path, "rb") as f:
            data = f.read()
        try:
            return _parse_json(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text, so not JSON (a torch.save file needs a .pt name)") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure of an untrusted file is a refusal
        raise ValueError(f"refused (only tensors and plain containers are accepted): "
                         f"{type(e).__name__}: {str(e)[:200]}") from None


def _checked_record(raw) -> dict[str, torch.Tensor]:
    if not isinstance(raw, dict) or not any(k in raw for k in RECORD_KEYS):
        raise ValueError(f"a record must be a dict with one of {RECORD_KEYS}")
    record = {}
    if "logical_count" in raw:
        count = _checked_tensor("logical_count", raw["logical_count"], (2, 3))
        record["logical_count"] = count if count.dim() == 3 else count.unsqueeze(0)
    for key in ("physical_to_logical_map", LAST_MAP_KEY):
        if key in raw:
            p2l = _checked_tensor(key, raw[key], (2,))
            if not bool((p2l == p2l.round()).all()):
                raise ValueError(f"record '{key}' must hold integer expert ids")
            record[key] = p2l.long()
    return record


def save_record(path: str | os.PathLike, record: dict[str, torch.Tensor]) -> None:
    """Write a record as JSON (path ends in .json) or with torch.save (tensors only)."""
    if str(path).endswith(".json"):
        with open(path, "w") as f:
            json.dump({k: v.tolist() for k, v in record.items()}, f)
    else:
        torch.save({k: v.cpu() for k, v in record.items()}, path)


def _parse_json(text: str):
    if len(text) > MAX_RECORD_BYTES:
        raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"malformed JSON: {e}") from None


def _checked_tensor(name: str, value, ndims: tuple[int, ...]) -> torch.Tensor:
    """One record entry as a float64 CPU tensor, if it is a real, finite, non-negative, modestly
    sized tensor (or nested list) with one of `ndims` dimensions; else ValueError."""
    if isinstance(value, list):
        try:
            value = torch.tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise ValueError(f"record '{name}' is not a rectangular array of numbers: {e}") from None
    if not isinstance(value, torch.Tensor) or type(value) is not torch.Tensor:
        raise ValueError(f"record '{name}' must be a tensor or nested list, got {type(value).__name__}")
    if value.layout != torch.strided or value.dtype == torch.bool or value.is_complex() or value.is_quantized:
        raise ValueError(f"record '{name}' must be a dense real tensor, got {value.dtype} {value.layout}")
    if value.dim() not in ndims or 0 in value.shape:
        raise ValueError(f"record '{name}' must have {' or '.join(map(str, ndims))} non-empty dims, "
                         f"got {tuple(value.shape)}")
    if value.numel() > MAX_RECORD_ELEMENTS:
        raise ValueError(f"record '{name}' has {value.numel()} elements (limit {MAX_RECORD_ELEMENTS})")
    value = value.detach().cpu().double()
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"record '{name}' contains NaN or infinity")
    if bool((value < 0).any()):
        raise ValueError(f"record '{name}' contains negative values")
    if bool((value > MAX_RECORD_VALUE).any()):
        raise ValueError(f"record '{name}' holds {value.max().item():.3g}, above 2**53: not a count or an expert id")
    return value
