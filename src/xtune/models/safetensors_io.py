"""Reading safetensors files as views of a file mapping, without copying tensors into new memory.

`safetensors.safe_open(...).get_tensor` copies each tensor into freshly allocated memory. A checkpoint
is mostly mid-size tensors (Qwen3-30B-A3B's experts are 3 MB each), below glibc's mmap threshold once
it has adapted, so the freed copies stay in the process's heap and its RSS grows with the checkpoint
even when the reader streams it. Views of a private (copy-on-write) mapping of the file cost only
the pages being read, and the kernel takes them back when the last view is gone.

The file layout is the documented safetensors format (https://github.com/huggingface/safetensors,
"Format"): an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data; offsets are relative to its start.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import torch

from xtune.errors import XtuneError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsView:
    """One safetensors file: its keys, and each tensor as a view of the mapped file (valid while referenced)."""

    def __init__(self, path):
        self.path = str(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise XtuneError(f"{self.path}: not a safetensors file (too short: {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise XtuneError(f"{self.path}: truncated or not a safetensors file (its header claims {n} bytes, "
                                 f"the file has {size}); copy or download it again")
            try:
                self.header = json.loads(f.read(n))
                if not isinstance(self.header, dict):
                    raise ValueError("the header is not a JSON object")
            except ValueError as e:
                raise XtuneError(f"{self.path}: not a safetensors file ({e})") from None
            self.header.pop("__metadata__", None)
            self.start = 8 + n
            # A file cut short keeps a valid header: its tensors' end offsets point past the end of the data.
            end = max((int(v["data_offsets"][1]) for v in self.header.values()
                       if isinstance(v, dict) and "data_offsets" in v), default=0)
            if self.start + end > size:
                raise XtuneError(f"{self.path}: truncated ({size} bytes, its header needs {self.start + end}); "
                                 "copy or download it again")
            # ACCESS_COPY: writable views (torch.frombuffer wants them), never written back to the file.
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, key: str) -> torch.Tensor:
        info = self.header[key]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise XtuneError(f"{self.path}: {key} has dtype {info['dtype']}, which xtune does not read")
        begin, end = info["data_offsets"]
        shape = info["shape"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self.map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=self.start + begin)
        return flat.view(shape)
