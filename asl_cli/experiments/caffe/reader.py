"""A minimal reader of Caffe's NetParameter protobuf (binary wire format): layer names, types and
weight blobs, enough to import trained models without Caffe or protobuf installed."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


from ...errors import CaffeFormatError


@dataclass
class Blob:
    shape: tuple[int, ...]
    data: np.ndarray  # float32, flat


@dataclass
class Layer:
    name: str
    type: str
    bottom: list[str] = field(default_factory=list)
    top: list[str] = field(default_factory=list)
    blobs: list[Blob] = field(default_factory=list)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise CaffeFormatError("unexpected end of data inside a varint (truncated file?)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CaffeFormatError("malformed varint")


def _fields(buf: memoryview):
    """(field number, wire type, value) of one message; length-delimited values as memoryviews."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise CaffeFormatError("field number 0 (not a protobuf message)")
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 1:
            if pos + 8 > n:
                raise CaffeFormatError("truncated 64-bit field")
            val, pos = buf[pos:pos + 8], pos + 8
        elif wt == 2:
            ln, pos = _varint(buf, pos)
            if pos + ln > n:
                raise CaffeFormatError(f"a field of {ln} bytes runs past the end of the data (truncated file?)")
            val, pos = buf[pos:pos + ln], pos + ln
        elif wt == 5:
            if pos + 4 > n:
                raise CaffeFormatError("truncated 32-bit field")
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise CaffeFormatError(f"unsupported wire type {wt}")
        yield num, wt, val


def _packed_varints(buf: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        v, pos = _varint(buf, pos)
        out.append(v)
    return out


def _blob(buf: memoryview) -> Blob:
    shape: list[int] = []
    legacy = {}
    chunks: list[np.ndarray] = []
    for num, wt, val in _fields(buf):
        if num == 7 and wt == 2:  # BlobShape
            for n2, w2, v2 in _fields(val):
                if n2 == 1:
                    shape += _packed_varints(v2) if w2 == 2 else [v2]
        elif num == 5:  # data: repeated float (packed or not)
            chunks.append(np.frombuffer(bytes(val), dtype="<f4"))  # packed, or one 32-bit value
        elif num == 8:  # double_data
            chunks.append(np.frombuffer(bytes(val), dtype="<f8").astype(np.float32))
        elif num in (1, 2, 3, 4) and wt == 0:  # legacy num, channels, height, width
            legacy[num] = val
    if not shape and legacy:
        shape = [legacy.get(i, 1) for i in (1, 2, 3, 4)]
    data = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if int(np.prod(shape)) != data.size:
        raise CaffeFormatError(f"a blob of shape {tuple(shape)} holds {data.size} values")
    return Blob(tuple(int(s) for s in shape), data.astype(np.float32, copy=False))


# Field numbers of LayerParameter and of the deprecated V1LayerParameter (whose type is an enum).
_LAYER_FIELDS = {False: dict(name=1, type=2, bottom=3, top=4, blobs=7), True: dict(name=4, type=5, bottom=2, top=3, blobs=6)}


def _layer(buf: memoryview, v1: bool) -> Layer:
    f = _LAYER_FIELDS[v1]
    layer = Layer(name="", type="")
    for num, wt, val in _fields(buf):
        if num == f["type"] and v1 and wt == 0:
            layer.type = f"V1:{val}"
        elif wt != 2:
            continue
        elif num == f["name"]:
            layer.name = bytes(val).decode("utf-8", "replace")
        elif num == f["type"]:
            layer.type = bytes(val).decode("utf-8", "replace")
        elif num == f["bottom"]:
            layer.bottom.append(bytes(val).decode())
        elif num == f["top"]:
            layer.top.append(bytes(val).decode())
        elif num == f["blobs"]:
            layer.blobs.append(_blob(val))
    return layer


def read_net(path: str | Path) -> tuple[str, list[Layer]]:
    """(network name, layers in file order) of a .caffemodel file."""
    p = Path(path)
    if not p.exists():
        raise CaffeFormatError(f"{p} does not exist")
    raw = p.read_bytes()
    if not raw:
        raise CaffeFormatError(f"{p} is empty")
    name, layers = "", []
    try:
        for num, wt, val in _fields(memoryview(raw)):
            if num == 1 and wt == 2:
                name = bytes(val).decode("utf-8", "replace")
            elif num == 100 and wt == 2:
                layers.append(_layer(val, v1=False))
            elif num == 2 and wt == 2:
                layers.append(_layer(val, v1=True))
    except CaffeFormatError as e:
        raise CaffeFormatError(f"{p} is not a readable Caffe model (truncated, corrupt or another format): {e}") from None
    except (UnicodeDecodeError, ValueError, struct.error) as e:
        raise CaffeFormatError(f"{p} is not a Caffe model: {e}") from None
    if not layers:
        raise CaffeFormatError(f"{p} holds no Caffe layers (is it a .caffemodel file?)")
    return name, layers
