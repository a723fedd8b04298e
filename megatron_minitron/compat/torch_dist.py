"""Megatron's `torch_dist` checkpoint format, read and written directly (the prune rewrite).

The format is torch DCP's plus two megatron files:
  .metadata               pickled torch.distributed.checkpoint Metadata: per key the global
                          shape, dtype and chunk boxes; per chunk a file, byte offset, length
  __<rank>_<n>.distcp     the chunks, each one `torch.save` blob, back to back
  metadata.json           megatron's CheckpointingConfig (sharded_backend "torch_dist")
  common.pt               megatron's non-sharded state (a torch.save'd dict)
ShardedObjects (`_extra_state`) are BYTE_IO items keyed `<key>/shard_<offset>_<shape>`,
holding `torch.save([data])`, as megatron writes them.

Why not megatron's own save/load: their fixed costs (DCP planning collectives, torch.load's
pure-python weights-only unpickler per chunk, forked writer processes and a results-queue
Manager on save) made `prune` 25.7x a plain copy of a 16 MiB checkpoint and 8.5x at 1.48
GiB (scripts/bench_prune.py; 4.9x and 1.8x with this module). Here a rank reads only the
chunks that overlap what it asks for, straight into tensor memory, and writes one file of
its main-replica shards, each blob byte-identical to torch.save's (CRCs off) but built
without it; one gather brings the chunk table to rank 0, which checks that the shards
tile every tensor and writes `.metadata` (no gather in a world of one). Per-tensor fixed
costs are kept small: the zip layout around a tensor is built once per dtype / shape /
stride, a blob's central directory and data.pkl are parsed once per distinct one,
`_extra_state` objects that are None are serialized once, and small tensors are copied on
one thread (OpThreads).

Safety: `prune` re-loads what was written through megatron's own loader and compares
every tensor exactly, so a drift of the format cannot pass silently. Items we do not
recognise (another pickle layout, compressed records, big-endian) are read with
torch.load(weights_only=True), never with an unrestricted unpickler.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import pickle
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# Large transfers go in pieces of this size: a single multi-MiB write() from user memory
# measured 10x slower than 256 KiB pieces on our CI VM (ext4), and no faster anywhere.
_IO_PIECE = 1 << 18
_LOCAL, _CENTRAL, _EOCD = b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"


class FormatError(ConfigError, RuntimeError):
    """The folder is not a readable torch_dist checkpoint (message names file and key).
    A ConfigError, so the CLI reports it in one line (exit 2), not as a traceback."""


def read_metadata(folder: str | Path):
    """The torch DCP Metadata of a megatron torch_dist checkpoint folder, or FormatError
    naming the file and what is wrong (missing, truncated, not a pickle of Metadata)."""
    from torch.distributed.checkpoint.metadata import Metadata

    folder = Path(folder)
    try:
        backend = json.loads((folder / "metadata.json").read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError) as e:
        raise FormatError(f"{folder}: no readable metadata.json ({e}); not a megatron "
                          "distributed checkpoint") from None
    if backend != "torch_dist":
        raise FormatError(f"{folder}: sharded_backend is {backend!r}; only 'torch_dist' "
                          "is supported (re-save the checkpoint with megatron's torch_dist backend)")
    path = folder / ".metadata"
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise FormatError(f"{path} is missing: the checkpoint is incomplete") from None
    except Exception as e:  # noqa: BLE001 - EOFError, UnpicklingError, ... from a damaged file
        raise FormatError(f"{path} is truncated or corrupt ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(md, Metadata) or not isinstance(getattr(md, "storage_data", None), dict):
        raise FormatError(f"{path} does not hold torch.distributed.checkpoint Metadata")
    return md


class _MetadataUnpickler(pickle.Unpickler):
    """.metadata holds only torch.distributed.checkpoint / torch classes and builtins: a
    foreign pickle cannot run code here."""

    def find_class(self, module, name):
        if module.split(".")[0] in ("torch", "collections", "builtins", "enum") or module == "_codecs":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected class {module}.{name}")


def check_files(folder: str | Path):
    """Cheap integrity check of a torch_dist checkpoint before any model is built: the
    .metadata parses, every shard file it names exists and is long enough for its items,
    common.pt is a complete zip. FormatError (one line, names the file) otherwise.
    Returns the Metadata. Byte flips inside tensor data cannot be seen: the format has
    no checksums."""
    import zipfile

    folder = Path(folder)
    md = read_metadata(folder)
    need: dict[str, int] = {}
    for idx, info in md.storage_data.items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str):
            raise FormatError(f"{folder}/.metadata: item {idx} has no shard file")
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(need.items()):
        p = folder / rel
        try:
            size = p.stat().st_size
        except OSError:
            raise FormatError(f"{p} is missing (.metadata lists items in it)") from None
        if size < end:
            raise FormatError(f"{p} is truncated: {size} bytes, .metadata needs {end}")
    common = folder / "common.pt"
    if common.exists():
        try:
            with zipfile.ZipFile(common) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise FormatError(f"{common} is truncated or corrupt ({e})") from None
    return md


# ----------------------------------------------------------------------------- reading


def _read_into(f, mv: memoryview) -> int:
    got = 0
    while got < len(mv):
        n = f.readinto(mv[got:got + _IO_PIECE])
        if not n:
            break
        got += n
    return got


def _write(f, data) -> None:
    mv = memoryview(data)
    for o in range(0, len(mv), _IO_PIECE):
        f.write(mv[o:o + _IO_PIECE])


class _Unsupported(Exception):
    pass


@dataclass
class _TensorRef:
    dtype: torch.dtype
    record: str
    offset: int
    size: tuple
    stride: tuple


def _rebuild(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    dtype, record = storage
    return _TensorRef(dtype, record, storage_offset, tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    """Reads the data.pkl of a `torch.save(tensor)` and nothing else: a tensor reference."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise _Unsupported(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in _STORAGE_DTYPES):
            raise _Unsupported(repr(pid))
        return _STORAGE_DTYPES[pid[1]], pid[2]


def _zip_records(mv: memoryview) -> dict | None:
    """name (without the archive folder) -> (data offset, size) of the stored records of
    a zip in `mv`; None for anything but plain stored zip32 records (then torch.load)."""
    end = len(mv) - 22  # torch writes no archive comment: the end record is the last 22 bytes
    if end >= 0 and mv[end:end + 4] == _EOCD and mv[end + 20:end + 22] == b"\0\0":
        tail, at = mv, end
    else:
        tail = bytes(mv[-min(len(mv), (1 << 16) + 22):])
        at = tail.rfind(_EOCD)
        if at < 0 or len(tail) - at < 22:
            return None
        end = len(mv) - len(tail) + at
    _, _, _, _, n, _, cd, _ = struct.unpack_from("<IHHHHIIH", tail, at)
    if n == 0xFFFF or cd == 0xFFFFFFFF or cd > end:
        return None
    # the central directory of blobs of one dtype / shape / stride repeats byte for byte:
    # parsed once per distinct directory
    central = bytes(mv[cd:end])
    entries = _CENTRAL_DIRS.get((n, central))
    if entries is None:
        entries = _central_entries(central, n)
        if len(_CENTRAL_DIRS) >= 4096:
            _CENTRAL_DIRS.clear()
        _CENTRAL_DIRS[(n, central)] = entries
    if not entries:
        return None
    out = {}
    for name, size, local in entries:
        if mv[local:local + 4] != _LOCAL:
            return None
        lname, lextra = struct.unpack_from("<HH", mv, local + 26)
        out[name] = (local + 30 + lname + lextra, size)
    return out


_CENTRAL_DIRS: dict = {}  # (entries, directory bytes) -> _central_entries
_PICKLES: dict = {}  # data.pkl bytes -> _TensorRef, or None (not a plain tensor)


def _central_entries(cd: bytes, n: int) -> tuple | None:
    """(name without the archive folder, size, local header offset) of the n entries at the
    start of `cd`; None unless every one is a plain stored zip32 record."""
    out, at = [], 0
    for _ in range(n):
        if cd[at:at + 4] != _CENTRAL or len(cd) < at + 46:
            return None
        (method, size, usize, name_len, extra_len, comment_len,
         local) = struct.unpack_from("<10xH8xIIHHH8xI", cd, at)
        name = cd[at + 46:at + 46 + name_len].decode(errors="replace")
        at += 46 + name_len + extra_len + comment_len
        if method != 0 or size != usize or 0xFFFFFFFF in (size, local):
            return None
        out.append((name.split("/", 1)[-1], size, local))
    return tuple(out)


def _tensor_ref(pkl: bytes) -> _TensorRef | None:
    if pkl in _PICKLES:
        return _PICKLES[pkl]
    try:
        ref = _Unpickler(io.BytesIO(pkl)).load()
    except (_Unsupported, pickle.UnpicklingError, TypeError, ValueError, EOFError):
        ref = None
    if not isinstance(ref, _TensorRef):
        ref = None
    if len(_PICKLES) >= 4096:
        _PICKLES.clear()
    _PICKLES[pkl] = ref
    return ref


def _parse_tensor(blob: torch.Tensor) -> torch.Tensor | None:
    """The tensor in one `torch.save` blob (a uint8 tensor), as a view of the blob's own
    memory; None when the blob is not the plain layout (the caller uses torch.load)."""
    mv = memoryview(blob.numpy())
    rec = _zip_records(mv)
    if rec is None or "data.pkl" not in rec or "byteorder" not in rec:
        return None
    (o, n), (bo, bn) = rec["data.pkl"], rec["byteorder"]
    if mv[bo:bo + bn] != b"little":
        return None
    ref = _tensor_ref(bytes(mv[o:o + n]))
    if ref is None or f"data/{ref.record}" not in rec:
        return None
    start, size = rec[f"data/{ref.record}"]
    itemsize = ref.dtype.itemsize
    if start + size > blob.numel() or size % itemsize or start % itemsize:
        return None
    data = blob[start:start + size].view(ref.dtype)
    return data.as_strided(ref.size, ref.stride, data.storage_offset() + ref.offset)  # offsets are absolute


class Reader:
    """Random access to the tensors of one torch_dist checkpoint folder (one rank's view;
    no collectives). Use as a context manager or call close()."""

    def __init__(self, folder: str | Path, metadata=None):
        """metadata: what check_files(folder) returned just before (skips reading and
        checking the folder a second time)."""
        self.folder = Path(folder)
        self.metadata = check_files(self.folder) if metadata is None else metadata
        self._files: dict[str, object] = {}
        self._buf: torch.Tensor | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __contains__(self, key: str) -> bool:
        return hasattr(self.metadata.state_dict_metadata.get(key), "chunks")

    def shape(self, key: str) -> tuple:
        return tuple(self._meta(key).size)

    def dtype(self, key: str) -> torch.dtype:
        return self._meta(key).properties.dtype

    def _meta(self, key: str):
        m = self.metadata.state_dict_metadata.get(key)
        if not hasattr(m, "chunks"):
            raise FormatError(f"{self.folder}: no tensor {key!r}")
        return m

    def _chunk(self, key: str, offsets, reuse: bool = False) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.metadata.storage_data.get(MetadataIndex(key, torch.Size(offsets)))
        if info is None:
            raise FormatError(f"{self.folder}: chunk {tuple(offsets)} of {key!r} is missing from .metadata")
        if getattr(info, "transform_descriptors", None):
            raise FormatError(f"{self.folder}: {key!r} uses storage transforms "
                              f"{info.transform_descriptors}, which this reader does not support")
        f = self._files.get(info.relative_path)
        if f is None:
            try:
                f = self._files[info.relative_path] = open(self.folder / info.relative_path, "rb", buffering=0)
            except OSError as e:
                raise FormatError(f"{self.folder}: cannot open shard file {info.relative_path} "
                                  f"(needed for {key!r}): {e}") from None
        if not reuse:
            blob = torch.empty(info.length, dtype=torch.uint8)  # read straight into tensor memory
        else:  # one growing buffer: no fresh pages to fault in per chunk
            if self._buf is None or self._buf.numel() < info.length:
                self._buf = torch.empty(info.length, dtype=torch.uint8)
            blob = self._buf[:info.length]
        f.seek(info.offset)
        if _read_into(f, memoryview(blob.numpy())) != info.length:
            raise FormatError(f"{self.folder}/{info.relative_path} is truncated (item {key!r} at "
                              f"{info.offset}+{info.length})")
        t = _parse_tensor(blob)
        if t is None:
            try:
                t = torch.load(io.BytesIO(blob.numpy().tobytes()), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - a damaged item: name it
                raise FormatError(f"{self.folder}/{info.relative_path}: item {key!r} at {info.offset} "
                                  f"is corrupt ({type(e).__name__})") from None
            if not isinstance(t, torch.Tensor):
                raise FormatError(f"{self.folder}/{info.relative_path}: item {key!r} is not a tensor")
        return t

    def read_box(self, key: str, lo, box, reuse: bool = False) -> torch.Tensor:
        """The global region [lo, lo+box) of tensor `key`, assembled from the chunks that
        overlap it (a view of the chunk when one chunk holds it all). reuse=True: the
        result may live in a buffer that the next read_box overwrites."""
        m = self._meta(key)
        lo, box = tuple(int(x) for x in lo), tuple(int(x) for x in box)
        hi = tuple(a + b for a, b in zip(lo, box))
        if len(lo) != len(m.size) or any(a < 0 or b > s for a, b, s in zip(lo, hi, m.size)):
            raise FormatError(f"{key}: region {lo}+{box} is outside the stored shape {tuple(m.size)}")
        parts = []
        for c in m.chunks:
            c_lo, c_hi = tuple(c.offsets), tuple(o + s for o, s in zip(c.offsets, c.sizes))
            i_lo = tuple(max(a, b) for a, b in zip(lo, c_lo))
            i_hi = tuple(min(a, b) for a, b in zip(hi, c_hi))
            if all(a < b for a, b in zip(i_lo, i_hi)):
                parts.append((c, c_lo, i_lo, i_hi))
        covered = sum(math.prod(b - a for a, b in zip(i_lo, i_hi)) for _, _, i_lo, i_hi in parts)
        if covered != math.prod(box):
            raise FormatError(f"{self.folder}: the chunks of {key!r} cover {covered} of the "
                              f"{math.prod(box)} elements of region {lo}+{box}")
        out = None
        for c, c_lo, i_lo, i_hi in parts:
            t = self._chunk(key, c.offsets, reuse)
            if tuple(t.shape) != tuple(c.sizes):
                raise FormatError(f"{self.folder}: chunk {tuple(c.offsets)} of {key!r} holds shape "
                                  f"{tuple(t.shape)}, .metadata says {tuple(c.sizes)}")
            if len(parts) == 1 and i_lo == c_lo and i_hi == c_hi:
                return t  # the region is this whole chunk
            src = t[tuple(slice(a - o, b - o) for a, b, o in zip(i_lo, i_hi, c_lo))]
            if len(parts) == 1:
                return src
            if out is None:
                out = torch.empty(box, dtype=t.dtype)
            out[tuple(slice(a - o, b - o) for a, b, o in zip(i_lo, i_hi, lo))] = src
        return out


# ----------------------------------------------------------------------------- writing


_STORAGE_NAMES = {v: k for k, v in _STORAGE_DTYPES.items()}


class _StorageRef:
    def __init__(self, cls_name: str, numel: int):
        self.cls_name, self.numel = cls_name, numel


class _TensorReduce:
    def __init__(self, args):
        self.args = args

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return "storage", getattr(torch, obj.cls_name), "0", "cpu", obj.numel
        return None


def torch_save_parts(t: torch.Tensor) -> tuple[bytes, memoryview, bytes] | None:
    """The bytes `torch.save(t)` writes to a stream with CRCs off, as (head, the tensor's
    own memory, tail): torch's zip layout and record order, 64-byte aligned records, one
    storage. Written directly: torch.save costs ~70 us of python per call, which a
    checkpoint of many small tensors pays thousands of times. `t` must be contiguous and
    own its storage. None where torch would write more than this does (empty tensors, sizes
    past zip32, dtypes without a legacy storage class): use torch.save then."""
    name = _STORAGE_NAMES.get(t.dtype)
    nbytes = t.numel() * t.element_size()
    if name is None or not 0 < nbytes <= 0xFFFF0000 or not t.is_contiguous() or t.storage_offset():
        return None
    key = (name, t.numel(), tuple(t.shape), tuple(t.stride()))
    layout = _SAVE_LAYOUTS.get(key)
    if layout is None:  # the zip around the data depends only on dtype, shape and stride
        if len(_SAVE_LAYOUTS) >= 4096:
            _SAVE_LAYOUTS.clear()
        layout = _SAVE_LAYOUTS[key] = _save_layout(name, t.numel(), key[2], key[3], nbytes)
    head, tail_pre, tail_post = layout
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    sid = b"%040d" % (uuid.uuid4().int % 10 ** 40)
    return head, data, tail_pre + sid + tail_post


_SAVE_LAYOUTS: dict = {}  # (storage class, numel, shape, stride) -> (head, tail before / after the id)


def _save_layout(name: str, numel: int, shape: tuple, stride: tuple, nbytes: int) -> tuple[bytes, bytes, bytes]:
    pkl = io.BytesIO()
    _Pickler(pkl, protocol=2).dump(_TensorReduce(
        (_StorageRef(name, numel), 0, shape, stride, False, collections.OrderedDict())))
    sid = b"0" * 40  # a placeholder: the id's record has a fixed size, so nothing else moves
    records = [("data.pkl", pkl.getvalue()), (".format_version", b"1"), (".storage_alignment", b"64"),
               ("byteorder", b"little"), ("data/0", nbytes), ("version", b"3\n"), (".data/serialization_id", sid)]
    parts, central, off = [], [], 0
    for rec, payload in records:
        fname = b"archive/" + rec.encode()
        n = payload if isinstance(payload, int) else len(payload)
        pad = -(off + 30 + len(fname) + 4) % 64
        local = (struct.pack("<4sHHHHHIIIHH", _LOCAL, 0, 0x808, 0, 0, 0, 0, 0, 0, len(fname), pad + 4)
                 + fname + b"FB" + struct.pack("<H", pad) + b"Z" * pad)
        parts += [local, payload, struct.pack("<4sIII", b"PK\x07\x08", 0, n, n)]
        central.append(struct.pack("<4sHHHHHHIIIHHHHHII", _CENTRAL, 0, 0, 0x808, 0, 0, 0, 0, n, n,
                                   len(fname), 0, 0, 0, 0, 0, off) + fname)
        off += len(local) + n + 16
    cd, k = b"".join(central), len(records)
    end = (struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 798, 45, 0, 0, k, k, len(cd), off)
           + struct.pack("<4sIQI", b"PK\x06\x07", 0, off + len(cd), 1)
           + struct.pack("<4sHHHHIIH", _EOCD, 0, 0, k, k, len(cd), off, 0))
    i, j = 3 * 4 + 1, 6 * 3 + 1  # indices of the data/0 and the serialization id payloads in parts
    return b"".join(parts[:i]), b"".join(parts[i + 1:j]), b"".join(parts[j + 1:]) + cd + end


@contextlib.contextmanager
def _no_crc32():
    """torch.load never checks the zip CRCs, so computing them only costs time."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None:
        yield
        return
    prev = get()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(prev)


def _exact(t: torch.Tensor) -> torch.Tensor:
    """torch.save writes a tensor's whole storage: clone views into their own storage."""
    t = t.detach().cpu()
    if (t.storage_offset() or not t.is_contiguous()
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
        t = t.clone(memory_format=torch.contiguous_format)
    return t


class OpThreads:
    """torch's intra-op threads only for tensors large enough to gain from them. A copy or
    gather of a few hundred KiB split over threads costs more in waking them than it saves
    (measured on 2 cores: 66 small index_selects 3.6 ms on one thread, 5-110 ms on two when
    another process is busy); a rewrite or save does such ops per tensor, so small ones run
    on one thread and large ones on all. A context manager; fit(numel) before each op. The
    thread count is restored on exit; one toggle costs ~25 us and happens only when the size
    class changes."""

    MIN_NUMEL = 1 << 20

    def __enter__(self):
        self.all = self.cur = torch.get_num_threads()
        return self

    def fit(self, numel: int) -> None:
        want = self.all if numel >= self.MIN_NUMEL else 1
        if want != self.cur:
            torch.set_num_threads(want)
            self.cur = want

    def __exit__(self, *exc):
        if self.cur != self.all:
            torch.set_num_threads(self.all)
            self.cur = self.all


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# test hook for the kill sweep: "RANK:N" SIGKILLs rank RANK right after its Nth shard reached
# the file (mid-write: a partial shard file, no .metadata); "metadata" SIGKILLs rank 0 halfway
# through writing .metadata
WRITE_FAULT_ENV = "MINITRON_WRITE_FAULT"


def _write_fault(where: str, f) -> None:
    if os.environ.get(WRITE_FAULT_ENV) == where:
        f.flush()
        os.kill(os.getpid(), 9)


def shard_data(st) -> torch.Tensor:
    """A ShardedTensor's data with its prepended axes as leading size-1 dims (a view), so
    that its shape matches global_offset / global_shape (megatron's SequentialMLP prepends
    the expert axis: each local expert is one [1, ...] chunk of the [experts, ...] tensor)."""
    if st.flattened_range is not None:
        raise FormatError(f"{st.key}: flattened shards are not supported")
    t = st.data
    for _ in range(st.prepend_axis_num):
        t = t.unsqueeze(0)
    return t


def save(tensors, objects, folder: str | Path, rank: int, group=None, fsync: bool = True,
         common: dict | None = None) -> dict:
    """Collective over `group` (every rank calls it; None = the default group): write the
    main-replica shards of megatron ShardedTensors `tensors` and ShardedObjects `objects`
    into `folder` (which must exist) as a torch_dist checkpoint that megatron's
    dist_checkpointing.load reads at any layout. Returns this rank's byte count."""
    import torch.distributed as dist

    from .mcore import is_main_replica

    folder = Path(folder)
    records, path = [], f"__{rank}_0.distcp"
    mine = [st for st in tensors if is_main_replica(st.replica_id)]
    objs = [ob for ob in objects if is_main_replica(ob.replica_id)]
    if mine or objs:
        with open(folder / path, "wb") as f, _no_crc32(), OpThreads() as threads:
            for st in mine:
                threads.fit(st.data.numel())
                t = _exact(shard_data(st))
                start = f.tell()
                parts = torch_save_parts(t)
                if parts is None:
                    torch.save(t, f)
                else:
                    for part in parts:
                        _write(f, part)
                records.append(("t", st.key, tuple(st.global_shape), t.dtype, tuple(st.global_offset),
                                tuple(t.shape), start, f.tell() - start))
                _write_fault(f"{rank}:{len(records)}", f)
            none_blob = None  # torch.save([None]) (~0.3 ms each) once: most _extra_state is None
            for ob in objs:
                if ob.data is None and none_blob is not None:
                    blob = none_blob
                else:
                    buf = io.BytesIO()
                    torch.save([ob.data], buf)
                    blob = buf.getvalue()
                    if ob.data is None:
                        none_blob = blob
                start = f.tell()
                f.write(blob)
                records.append(("o", ob.unique_key, None, None, None, None, start, f.tell() - start))
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    nbytes = sum(r[-1] for r in records)
    gathered, is_root = [(path, records)], True
    if dist.is_initialized() and dist.get_world_size(group) > 1:  # a world of one: nothing to gather
        is_root = dist.get_rank(group) == 0
        gathered = [None] * dist.get_world_size(group) if is_root else None
        root = 0 if group is None else dist.get_global_rank(group, 0)
        dist.gather_object((path, records), gathered, dst=root, group=group)
    if is_root:
        _write_metadata(folder, gathered, common or {}, fsync)
    return {"bytes_written": nbytes, "file": path if records else None}


def _write_metadata(folder: Path, gathered, common: dict, fsync: bool) -> None:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata,
                                                       Metadata, MetadataIndex, TensorProperties,
                                                       TensorStorageMetadata)

    from . import mcore

    sd_meta, storage = {}, {}
    for path, records in gathered:
        for kind, key, gshape, dtype, off, shape, start, length in records:
            if kind == "o":
                if key in sd_meta:
                    raise FormatError(f"object {key!r} written by two ranks")
                sd_meta[key] = BytesStorageMetadata()
                storage[MetadataIndex(key)] = _StorageInfo(path, start, length)
                continue
            m = sd_meta.get(key)
            if m is None:
                m = sd_meta[key] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(gshape), [])
            elif tuple(m.size) != gshape or m.properties.dtype != dtype:
                raise FormatError(f"{key}: ranks disagree on the global shape / dtype "
                                  f"({tuple(m.size)}, {m.properties.dtype}) vs ({gshape}, {dtype})")
            idx = MetadataIndex(key, torch.Size(off))
            if idx in storage:
                raise FormatError(f"{key}: chunk at offset {off} written twice (replica_id bug)")
            m.chunks.append(ChunkStorageMetadata(torch.Size(off), torch.Size(shape)))
            storage[idx] = _StorageInfo(path, start, length)
    for key, m in sd_meta.items():  # every element exactly once
        if isinstance(m, TensorStorageMetadata):
            _check_tiling(key, m)
    tmp = folder / ".metadata.tmp"
    with open(tmp, "wb") as f:
        blob = pickle.dumps(Metadata(state_dict_metadata=sd_meta, storage_data=storage))
        f.write(blob[:len(blob) // 2])
        _write_fault("metadata", f)
        f.write(blob[len(blob) // 2:])
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, folder / ".metadata")
    torch.save(common, folder / "common.pt")
    mcore.save_checkpointing_config(str(folder))
    if fsync:
        for name in ("common.pt", "metadata.json"):
            fsync_path(folder / name)
        fsync_path(folder)


def _check_tiling(key: str, m) -> None:
    """The chunks of one tensor lie inside it, do not overlap, and add up to it."""
    boxes = [(tuple(c.offsets), tuple(o + s for o, s in zip(c.offsets, c.sizes))) for c in m.chunks]
    vol = sum(math.prod(b - a for a, b in zip(lo, hi)) for lo, hi in boxes)
    outside = [lo for lo, hi in boxes if any(b > g for b, g in zip(hi, m.size))]
    overlap = [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
               if all(max(x0, y0) < min(x1, y1) for x0, x1, y0, y1 in zip(a[0], a[1], b[0], b[1]))]
    if vol != math.prod(m.size) or outside or overlap:
        raise FormatError(f"{key}: the written shards do not tile shape {tuple(m.size)} (cover {vol} of "
                          f"{math.prod(m.size)} elements; outside: {outside[:3]}; overlapping: {overlap[:3]})")
