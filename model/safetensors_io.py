"""Safetensors files read and written one tensor at a time, so that converting a checkpoint never
holds more than one tensor (DeepSeek-V3's release is 163 files, 688 GB).

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, a
JSON header of N bytes mapping each tensor name to {dtype, shape, data_offsets [begin, end)} relative
to the data that follows (plus an optional "__metadata__" of strings), then the raw little-endian
tensor bytes.

`TensorReader` reads a tensor with positioned reads straight into the tensor's memory. It does not
memory-map the file: pages of a mapped file that were read stay in the process's resident set
until the whole mapping is dropped, so reading a file tensor by tensor through a mapping ends with
the file's size resident. `ShardWriter` writes the header first (names, dtypes and shapes are known
in advance) and then each tensor's bytes as it comes.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


def read_header(path: Path) -> Tuple[Dict[str, dict], int]:
    """(tensor name -> {dtype, shape, data_offsets}, byte offset of the data) of a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a safetensors file (bad header: {err})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class TensorReader:
    """The tensors of a set of safetensors files, read one at a time by name."""

    def __init__(self, files: Sequence[Path]):
        self.entries: Dict[str, Tuple[Path, dict, int]] = {}
        for path in files:
            header, start = read_header(Path(path))
            for name, info in header.items():
                if name in self.entries:
                    raise ValueError(f"tensor {name} is in both {self.entries[name][0].name} and {Path(path).name}")
                self.entries[name] = (Path(path), info, start)

    def keys(self) -> List[str]:
        return list(self.entries)

    def file_of(self, name: str) -> Path:
        return self.entries[name][0]

    def dtype(self, name: str) -> torch.dtype:
        info = self.entries[name][1]
        if info["dtype"] not in DTYPES:
            raise ValueError(f"tensor {name} in {self.file_of(name).name} has dtype {info['dtype']}, "
                             f"not one of {sorted(DTYPES)}")
        return DTYPES[info["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` in its stored dtype, read from disk into fresh memory."""
        path, info, start = self.entries[name]
        dtype, shape = self.dtype(name), info["shape"]
        begin, end = info["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name} in {path.name}: {end - begin} bytes for shape {shape} of {info['dtype']}")
        out = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            view, done = memoryview(out.numpy()), 0
            while done < len(view):
                got = os.preadv(f.fileno(), [view[done:]], start + begin + done)
                if got <= 0:
                    raise ValueError(f"{path.name} ends inside tensor {name}")
                done += got
        return out.view(dtype).reshape(shape)


class ShardWriter:
    """One safetensors file written tensor by tensor, in the order of `entries` [(name, dtype, shape)]."""

    def __init__(self, path: Path, entries: Sequence[Tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path, self.order = Path(path), [e[0] for e in entries]
        header: Dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self.expected: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]] = {}
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected[name] = (dtype, tuple(shape))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append tensor `name`, which must be the next one of `entries`, with its dtype and shape."""
        if self.next >= len(self.order) or self.order[self.next] != name:
            raise ValueError(f"{self.path.name}: got tensor {name}, expected "
                             f"{self.order[self.next] if self.next < len(self.order) else 'no more tensors'}")
        dtype, shape = self.expected[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path.name}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"the header says {dtype} {shape}")
        data = tensor.detach().cpu().contiguous()
        self.file.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self.next += 1

    @property
    def done(self) -> bool:
        return self.next == len(self.order)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close the file; ValueError if it ends without error but tensors of the header were not written."""
        self.file.close()
        if exc_type is None and not self.done:
            raise ValueError(f"{self.path.name}: {len(self.order) - self.next} tensor(s) of the header not written")
