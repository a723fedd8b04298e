"""compat.torch_dist: the direct reader / writer of megatron's torch_dist format, checked
against torch.save / torch.load and against megatron's own dist_checkpointing save / load."""

import io

import pytest
import torch

from megatron_minitron import dist as D
from megatron_minitron.compat import mcore
from megatron_minitron.compat import torch_dist as T
from megatron_minitron.config import ParallelConfig

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool]
SHAPES = [(), (7,), (3, 5), (2, 3, 4)]


@pytest.fixture(scope="module")
def world1():
    par = D.init(ParallelConfig(), seed=3)
    yield par
    D.shutdown()  # frees the rendezvous port that later subprocess launches may be given


def _tensor(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * 50
    return (t > 0) if dtype == torch.bool else t.to(dtype)


def _torch_save(t, crc=False):
    prev = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(crc)
    try:
        buf = io.BytesIO()
        torch.save(t, buf)
        return buf.getvalue()
    finally:
        torch.serialization.set_crc32_options(prev)


@pytest.mark.smoke
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_written_blob_is_torch_save_byte_for_byte(dtype, shape):
    t = _tensor(dtype, shape)
    ref = _torch_save(t)
    head, data, tail = T.torch_save_parts(t)
    mine = head + bytes(data) + tail
    assert len(mine) == len(ref)
    # the only difference allowed: the 40 random digits of the serialization id record
    diff = [i for i in range(len(ref)) if ref[i] != mine[i]]
    assert diff and max(diff) - min(diff) < 40 and all(chr(mine[i]).isdigit() for i in diff)
    back = torch.load(io.BytesIO(mine), weights_only=True)
    assert back.dtype == t.dtype and torch.equal(back, t)


def test_writer_leaves_unusual_tensors_to_torch_save():
    assert T.torch_save_parts(torch.empty(0, 4)) is None  # torch lays out empty storages differently
    assert T.torch_save_parts(torch.randn(4, 3).t()) is None  # not contiguous
    assert T.torch_save_parts(torch.randn(8)[2:]) is None  # does not own its storage


@pytest.mark.smoke
@pytest.mark.parametrize("crc", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reader_parses_torch_save_blobs(dtype, crc):
    base = _tensor(dtype, (4, 6), seed=1)
    # plain, transposed (permuted strides) and offset views: torch.save keeps the storage
    for t in (base, base.t(), base[1:, 2:], base[0, 0]):
        blob = torch.frombuffer(bytearray(_torch_save(t, crc)), dtype=torch.uint8)
        got = T._parse_tensor(blob)
        assert got is not None and got.dtype == t.dtype and got.shape == t.shape
        assert got.stride() == t.stride() and torch.equal(got, t)


def test_reader_declines_blobs_that_are_not_a_plain_tensor():
    for obj in ([1, 2], {"a": torch.ones(2)}, torch.ones(2, dtype=torch.complex64)):
        blob = torch.frombuffer(bytearray(_torch_save(obj)), dtype=torch.uint8)
        assert T._parse_tensor(blob) is None  # Reader falls back to torch.load(weights_only)


def _sharded(key, full, rows_at, replica_id=0):
    """ShardedTensors of `full` split along dim 0 at `rows_at` (one process holds them all)."""
    if full.dim() == 0:
        return [mcore.ShardedTensor(key, full.clone(), full.dtype, (), (), (), None, replica_id=replica_id)]
    out, edges = [], [0, *rows_at, full.shape[0]]
    for a, b in zip(edges, edges[1:]):
        off = (a,) + (0,) * (full.dim() - 1)
        out.append(mcore.ShardedTensor(key, full[a:b].clone(), full.dtype, tuple(full[a:b].shape),
                                       tuple(full.shape), off, None, replica_id=replica_id))
    return out


def test_reader_reads_megatron_checkpoints_and_writer_is_read_by_megatron(world1, tmp_path):
    g = torch.Generator().manual_seed(5)
    full = {"w": torch.randn(7, 5, generator=g), "b": torch.randn(9, generator=g).bfloat16(),
            "s": torch.tensor(2.5)}
    # 1. megatron writes (two row chunks for w and b), our reader reads any box
    sd = {"w": _sharded("w", full["w"], [3]), "b": _sharded("b", full["b"], [4]), "s": _sharded("s", full["s"], [])}
    (tmp_path / "meg").mkdir()
    mcore.dist_checkpointing.save(sd, str(tmp_path / "meg"))
    with T.Reader(tmp_path / "meg") as r:
        assert r.shape("w") == (7, 5) and r.dtype("b") == torch.bfloat16 and "nothing" not in r
        assert torch.equal(r.read_box("w", (0, 0), (7, 5)), full["w"])
        assert torch.equal(r.read_box("w", (2, 1), (3, 4)), full["w"][2:5, 1:5])  # spans both chunks
        assert torch.equal(r.read_box("w", (4, 0), (2, 5), reuse=True), full["w"][4:6])
        assert torch.equal(r.read_box("b", (3,), (3,)), full["b"][3:6])
        assert torch.equal(r.read_box("s", (), ()), full["s"])
        with pytest.raises(T.FormatError, match="outside the stored shape"):
            r.read_box("w", (5, 0), (3, 5))
        with pytest.raises(T.FormatError, match="no tensor 'nothing'"):
            r.read_box("nothing", (0,), (1,))
    # 2. we write (different chunking, a replica that must not be written, an object),
    #    megatron loads it at yet another chunking
    tensors = [*_sharded("w", full["w"], [2, 6]), *_sharded("b", full["b"], [1]), *_sharded("s", full["s"], []),
               *_sharded("w", full["w"] * 0, [], replica_id=1)]
    obj = mcore.ShardedObject("extra", {"fp8": [1, 2]}, (1,), (0,), replica_id=0)
    (tmp_path / "ours").mkdir()
    T.save(tensors, [obj], tmp_path / "ours", rank=0, fsync=False)
    want = {"w": _sharded("w", torch.zeros(7, 5), [5]), "b": _sharded("b", torch.zeros(9, dtype=torch.bfloat16), []),
            "s": _sharded("s", torch.zeros(()), []),
            "extra": mcore.ShardedObject("extra", None, (1,), (0,), replica_id=0)}
    got = mcore.dist_checkpointing.load(want, str(tmp_path / "ours"))
    assert torch.equal(torch.cat(got["w"]), full["w"]) and torch.equal(got["b"][0], full["b"])
    assert torch.equal(got["s"][0], full["s"]) and got["extra"] == {"fp8": [1, 2]}


def test_writer_refuses_shards_that_do_not_tile(world1, tmp_path):
    full = torch.arange(12.0).reshape(6, 2)
    (tmp_path / "gap").mkdir()
    with pytest.raises(T.FormatError, match="do not tile"):
        T.save(_sharded("w", full, [2])[:1], [], tmp_path / "gap", rank=0, fsync=False)
    overlap = _sharded("w", full, [3]) + [mcore.ShardedTensor("w", full[2:4].clone(), full.dtype, (2, 2), (6, 2),
                                                              (2, 0), None, replica_id=0)]
    (tmp_path / "overlap").mkdir()
    with pytest.raises(T.FormatError, match="do not tile|written twice"):
        T.save(overlap, [], tmp_path / "overlap", rank=0, fsync=False)
    assert not (tmp_path / "gap" / ".metadata").exists()


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(T.FormatError, match="no readable metadata.json"):
        T.Reader(tmp_path)
    (tmp_path / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    with pytest.raises(T.FormatError, match="only 'torch_dist'"):
        T.Reader(tmp_path)
