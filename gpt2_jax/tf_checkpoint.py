"""Reads TensorFlow checkpoints (the tensor-bundle format of OpenAI's GPT-2 release) without TensorFlow.

A checkpoint `PREFIX` is `PREFIX.index`, a LevelDB-style sorted table mapping each variable name to
a BundleEntryProto (dtype, shape, shard, offset, size), and `PREFIX.data-0000i-of-0000n` files
holding the raw little-endian tensor bytes. Only uncompressed tables (what TensorFlow writes for
bundles) and plain, unsliced tensors are supported, which is all a GPT-2 release holds.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from gpt2_jax import storage
from gpt2_jax.errors import UserError

_TABLE_MAGIC = 0xDB4775248B80FB57
# TensorFlow's DataType enum values -> numpy dtypes.
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
           9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of a protobuf message; varints as ints, the rest as bytes."""
    fields, pos = [], 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append((number, value))
    return fields


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """Key/value pairs of one table block (keys are prefix-compressed against the previous key)."""
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * num_restarts
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + value_len]))
        pos += value_len
    return entries


def _read_block(data: bytes, offset: int, size: int, path: Path) -> bytes:
    if offset + size + 5 > len(data):
        raise UserError(f"{path}: truncated (a block ends past the end of the file); download it again")
    if data[offset + size] != 0:
        raise UserError(f"{path}: compressed checkpoint index blocks are not supported")
    return data[offset:offset + size]


def _read_index(path: Path) -> dict[str, bytes]:
    data = path.read_bytes()
    if len(data) < 48 or struct.unpack_from("<Q", data, len(data) - 8)[0] != _TABLE_MAGIC:
        raise UserError(f"{path}: not a TensorFlow checkpoint index (bad magic number)")
    footer = data[-48:]
    _, pos = _varint(footer, 0)  # metaindex block handle: offset
    _, pos = _varint(footer, pos)  # ... and size (unused)
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    table: dict[str, bytes] = {}
    for _, handle in _block_entries(_read_block(data, index_offset, index_size, path)):
        offset, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        for key, value in _block_entries(_read_block(data, offset, size, path)):
            table[key.decode("utf-8")] = value
    return table


def _shape(shape_proto: bytes) -> tuple[int, ...]:
    dims = []
    for number, dim in _proto_fields(shape_proto):
        if number == 2:  # repeated Dim dim
            size = dict(_proto_fields(dim)).get(1, 0)
            dims.append(size)
    return tuple(dims)


def read_checkpoint(prefix: str | Path) -> dict[str, np.ndarray]:
    """All variables of the checkpoint at `prefix` (e.g. models/124M/model.ckpt), by name."""
    prefix = storage.path(prefix)
    index_path = storage.path(str(prefix) + ".index")
    if not index_path.is_file():
        raise UserError(f"{index_path}: no such checkpoint index")
    table = _read_index(index_path)
    header = dict(_proto_fields(table.pop("", b"")))
    num_shards = header.get(1, 1)
    shards: dict[int, np.memmap] = {}
    out = {}
    for name, entry_bytes in table.items():
        entry = dict(_proto_fields(entry_bytes))
        if 7 in entry:
            raise UserError(f"{index_path}: variable {name} is stored in slices, which this reader does not support")
        dtype = _DTYPES.get(entry.get(1))
        if dtype is None:
            raise UserError(f"{index_path}: variable {name} has unsupported TensorFlow dtype {entry.get(1)}")
        shape = _shape(entry.get(2, b""))
        shard, offset, size = entry.get(3, 0), entry.get(4, 0), entry.get(5, 0)
        if shard not in shards:
            data_path = storage.path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")
            if not data_path.is_file():
                raise UserError(f"{data_path}: missing checkpoint data file; download it again")
            if storage.size(data_path) == 0:  # np.memmap cannot map an empty file
                raise UserError(f"{data_path}: the checkpoint data file is empty; download it again")
            shards[shard] = np.memmap(data_path, dtype=np.uint8, mode="r") if not storage.is_url(data_path) else \
                np.frombuffer(data_path.read_bytes(), np.uint8)  # a URL's is read into memory
        raw = shards[shard]
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if size != expected or offset + size > raw.shape[0]:
            raise UserError(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}: variable {name} needs bytes "
                            f"[{offset}, {offset + size}) of {raw.shape[0]}; the file is truncated or corrupt")
        out[name] = np.frombuffer(raw[offset:offset + size], dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return out


def checkpoint_prefix(model_dir: Path) -> Path | None:
    """The checkpoint prefix of a directory: from its `checkpoint` file, else model.ckpt if present."""
    state = model_dir / "checkpoint"
    if state.is_file():
        # a damaged state file falls back to model.ckpt
        for line in state.read_bytes().decode("utf-8", "replace").splitlines():
            if line.startswith("model_checkpoint_path:"):
                name = Path(line.split(":", 1)[1].strip().strip('"')).name
                if storage.path(f"{model_dir / name}.index").is_file():
                    return model_dir / name
    if (model_dir / "model.ckpt.index").is_file():
        return model_dir / "model.ckpt"
    return None
