"""``prepare-vtab --source-format`` on fabricated miniature sources (TFDS TFRecords, CIFAR binary, SVHN .mat)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from peft_core.cli import main
from peft_core.errors import InputError
from peft_core.provenance import source_record
from peft_core.tfrecord import count_records, crc32c_py, masked_crc, parse_example, read_records
from peft_core.vtab import check_root
from peft_core.vtab_build import FORMAT, build

# ---------------------------------------------------------------- a writer of our own, for the tests


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64: ten bytes, two's complement
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(features: dict[str, list], packed: bool = True) -> bytes:
    """tf.train.Example: bytes -> BytesList, float -> FloatList, int -> Int64List."""
    entries = b""
    for key, values in features.items():
        if values and isinstance(values[0], bytes):
            feature = _len_field(1, b"".join(_len_field(1, v) for v in values))
        elif values and isinstance(values[0], float):
            if packed:
                body = _len_field(1, struct.pack(f"<{len(values)}f", *values))
            else:
                body = b"".join(_varint(1 << 3 | 5) + struct.pack("<f", v) for v in values)
            feature = _len_field(2, body)
        else:
            if packed:
                body = _len_field(1, b"".join(_varint(v) for v in values))
            else:
                body = b"".join(_varint(1 << 3 | 0) + _varint(v) for v in values)
            feature = _len_field(3, body)
        entries += _len_field(1, _len_field(1, key.encode()) + _len_field(2, feature))
    return _len_field(1, entries)


def write_tfrecord(path: Path, records: list[bytes]) -> None:
    with open(path, "wb") as f:
        for data in records:
            head = struct.pack("<Q", len(data))
            f.write(head + struct.pack("<I", masked_crc(head)) + data + struct.pack("<I", masked_crc(data)))


def png(value: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    shape = (2, 2, 3) if mode == "RGB" else (2, 2)
    Image.fromarray(np.full(shape, value % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def fake_tfds(data_dir: Path, builder: str, version: str, splits: dict[str, list[list[dict]]]) -> Path:
    """``<data_dir>/<builder>/<version>/``: dataset_info.json + shards; ``splits``: split -> shards -> features."""
    folder = data_dir / builder / version
    folder.mkdir(parents=True)
    name = builder.split("/")[0]
    info = {"name": name, "version": version, "splits": []}
    for split, shards in splits.items():
        for k, shard in enumerate(shards):
            path = folder / f"{name}-{split}.tfrecord-{k:05d}-of-{len(shards):05d}"
            write_tfrecord(path, [encode_example(f) for f in shard])
        info["splits"].append({"name": split, "shardLengths": [str(len(s)) for s in shards]})
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


def kitti_example(i: int) -> dict[str, list]:
    z = [3.0, 10.0, 25.0, 5.0][i % 4]
    types = [0] if i % 4 < 3 else [3]  # the 4th kind has a pedestrian only: class 3
    return {"image": [png(i)], "objects/type": types, "objects/location": [0.5, -1.0, z]}


# ---------------------------------------------------------------- the reader and decoder


def test_crc_and_wire_format(tmp_path):
    assert crc32c_py(b"123456789") == 0xE3069283  # the CRC-32C check value
    feats = {"image": [b"\x89PNG", b"x"], "objects/location": [1.5, -2.0, 30.25], "label": [-3, 7, 1 << 40]}
    for packed in (True, False):
        assert parse_example(encode_example(feats, packed=packed)) == feats
    path = tmp_path / "x.tfrecord"
    write_tfrecord(path, [b"a", b"bb", b"ccc"])
    assert list(read_records(path)) == [(0, b"a"), (1, b"bb"), (2, b"ccc")]
    assert list(read_records(path, wanted=[2])) == [(2, b"ccc")]
    assert count_records(path) == 3
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1  # flip a data bit of the last record
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="data checksum"):
        list(read_records(path))


# ---------------------------------------------------------------- builds, checked by check_root


@pytest.fixture
def kitti_src(tmp_path) -> Path:
    train = [kitti_example(i) for i in range(900)]
    splits = {"train": [train[:500], train[500:]], "validation": [[kitti_example(i) for i in range(900, 1150)]],
              "test": [[kitti_example(i) for i in range(1150, 1162)]]}  # fmt: skip
    fake_tfds(tmp_path / "tfds", "kitti", "3.1.0", splits)
    return tmp_path / "tfds"


def test_tfds_kitti_build_is_checked_official_and_deterministic(kitti_src, tmp_path, capsys):
    rc = main(["prepare-vtab", "--source-format", "tfds", "--source", str(kitti_src), "--dataset", "kitti",
               "--out", str(tmp_path / "a"), "--full"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "kitti" in out and "ok" in out
    folder = tmp_path / "a" / "kitti"
    lines = (folder / "train800.txt").read_text().splitlines()
    assert lines[0] == "images/train/000000.png 0" and lines[3] == "images/train/000003.png 3"
    assert lines[1] == "images/train/000001.png 1" and lines[2] == "images/train/000002.png 2"
    assert (folder / "val200.txt").read_text().splitlines()[0] == "images/validation/000000.png 0"
    assert len((folder / "test.txt").read_text().splitlines()) == 12
    # record 600 sits in the second shard: shard order, then record order
    with Image.open(folder / "images/train/000600.png") as img:
        assert img.getpixel((0, 0)) == (600 % 256,) * 3 and img.info == {}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and manifest["official"] is True
    assert manifest["splits"]["val200"] == {"slice": "validation[:200]", "images": 200}
    assert manifest["task_adaptation"]["commit"] == "d7630d3c43ba052b5a35546b312d9454a9f2c96b"
    assert manifest["resize"].startswith("none")
    assert source_record(folder / "train800.txt", "vtab", 224, "bicubic")["source_format"] == f"{FORMAT} from tfds"
    # the same inputs: byte-identical files
    build("tfds", kitti_src / "kitti" / "3.1.0", "kitti", tmp_path / "b")
    a = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    b = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    ma, mb = json.loads(a.pop(Path("kitti/manifest.json"))), json.loads(b.pop(Path("kitti/manifest.json")))
    assert a == b
    ma["source"].pop("tfds_dir"), mb["source"].pop("tfds_dir")
    assert ma == mb


def test_tfds_clevr_held_out_cut(tmp_path):
    """clevr: val200 = train[90%:90%+200]; test = TFDS validation; label = number of objects - 3."""
    train = [{"image": [png(i, "L")], "objects/size": [0] * (3 + i % 8), "objects/pixel_coords": [0.0, 0.0, 9.2] * (3 + i % 8)}
             for i in range(2000)]  # fmt: skip
    val = [{"image": [png(i)], "objects/size": [1] * 4, "objects/pixel_coords": [0.0, 0.0, 9.2] * 4} for i in range(7)]
    fake_tfds(tmp_path / "tfds", "clevr", "3.1.0", {"train": [train[:1000], train[1000:]], "validation": [val]})
    folder = build("tfds", tmp_path / "tfds", "clevr_count", tmp_path / "out")
    val200 = (folder / "val200.txt").read_text().splitlines()
    assert val200[0] == f"images/train/001800.png {1800 % 8}" and len(val200) == 200
    assert (folder / "test.txt").read_text().splitlines()[0] == "images/validation/000000.png 1"
    assert json.loads((folder / "manifest.json").read_text())["splits"]["val200"]["slice"] == "train[1800:2000]"
    text, problems = check_root(tmp_path / "out", ["clevr_count"], full=True)
    assert problems == 0, text
    with Image.open(folder / "images/train/000000.png") as img:
        assert img.mode == "L"  # grayscale kept; the cache step converts to RGB


def test_cifar_binary(tmp_path):
    src = tmp_path / "cifar-100-binary"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", 2000), ("test.bin", 9)):
        recs = [bytes([i % 20, i % 100]) + rng.integers(0, 256, 3072, dtype=np.uint8).tobytes() for i in range(n)]
        (src / name).write_bytes(b"".join(recs))
    folder = build("cifar-binary", tmp_path, "cifar100", tmp_path / "out")
    assert (folder / "val200.txt").read_text().splitlines()[0] == "images/train/001800.png 0"  # fine label 1800 % 100
    rec = (src / "train.bin").read_bytes()[5 * 3074 : 6 * 3074]
    with Image.open(folder / "images/train/000005.png") as img:
        assert np.array_equal(np.asarray(img), np.frombuffer(rec[2:], np.uint8).reshape(3, 32, 32).transpose(1, 2, 0))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["official"] is False and "not the official images" in manifest["order"]
    text, problems = check_root(tmp_path / "out", ["cifar100"], full=True)
    assert problems == 0, text


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split, n in (("train", 2000), ("test", 11)):
        y = (np.arange(n) % 10 + 1).reshape(-1, 1)  # 1..10; 10 is the digit 0
        savemat(tmp_path / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y})
    folder = build("svhn-mat", tmp_path, "svhn", tmp_path / "out")
    train = (folder / "train800.txt").read_text().splitlines()
    assert train[0].endswith(" 1") and train[9].endswith(" 0")  # y = 10 -> label 0
    assert (folder / "val200.txt").read_text().splitlines()[0] == "images/train/001800.png 1"
    text, problems = check_root(tmp_path / "out", ["svhn"], full=True)
    assert problems == 0, text


def test_refusals(tmp_path, kitti_src, capsys):
    with pytest.raises(InputError, match="cifar100 only"):
        build("cifar-binary", tmp_path, "svhn", tmp_path / "out")
    with pytest.raises(InputError, match="no TFDS version folder"):
        build("tfds", kitti_src, "dmlab", tmp_path / "out")
    with pytest.raises(InputError, match="has 12 images"):  # too small a validation split for val200
        fake_tfds(tmp_path / "small", "dtd", "3.0.1", {"train": [[{"image": [png(0)], "label": [0]}] * 800],
                                                        "validation": [[{"image": [png(0)], "label": [0]}] * 12],
                                                        "test": [[{"image": [png(0)], "label": [0]}]]})  # fmt: skip
        build("tfds", tmp_path / "small", "dtd", tmp_path / "out")
    info_path = kitti_src / "kitti/3.1.0/dataset_info.json"
    info = json.loads(info_path.read_text())
    info["splits"][0]["shardLengths"] = ["400", "500"]  # the files hold 500 + 400
    info_path.write_text(json.dumps(info))
    with pytest.raises(InputError, match="500 records, dataset_info.json says 400"):
        build("tfds", kitti_src, "kitti", tmp_path / "out")
    assert main(["prepare-vtab", "--source-format", "tfds", "--dataset", "kitti"]) == 2
    assert "--source" in capsys.readouterr().err
    assert main(["prepare-vtab"]) == 2


def test_source_encoding_keeps_the_record_bytes(kitti_src, tmp_path, capsys):
    rc = main(["prepare-vtab", "--source-format", "tfds", "--source", str(kitti_src), "--dataset", "kitti",
               "--out", str(tmp_path / "a"), "--image-encoding", "source"])  # fmt: skip
    assert rc == 0, capsys.readouterr().out
    folder = tmp_path / "a" / "kitti"
    assert (folder / "images/train/000007.png").read_bytes() == kitti_example(7)["image"][0]
    assert "source" in json.loads((folder / "manifest.json").read_text())["image_encoding"]
    with pytest.raises(InputError, match="rescaled"):
        build("tfds", kitti_src, "dsprites_loc", tmp_path / "b", image_encoding="source")
    with pytest.raises(InputError, match="raw pixels"):
        build("svhn-mat", tmp_path, "svhn", tmp_path / "b", image_encoding="source")


def test_a_record_without_the_task_feature_is_refused(tmp_path):
    """Records with no label_x_position (another data set's): building dsprites_loc names the record."""
    fake_tfds(tmp_path, "dsprites", "2.0.0", {"train": [[{"image": [png(0, "L")], "label": [0]}] * 1000]})
    with pytest.raises(InputError, match="record 0: no dsprites_loc label"):
        build("tfds", tmp_path, "dsprites_loc", tmp_path / "out")


def test_tfds_dsprites_scales_pixels_and_bins_labels(tmp_path):
    """dsprites: one TFDS split; 0/1 pixels x255; x position 32 -> 16 bins; test = train[90%:]."""
    def ex(i):
        return {"image": [png(i % 2, "L")], "label_x_position": [i % 32], "label_orientation": [i % 40]}

    fake_tfds(tmp_path, "dsprites", "2.0.1", {"train": [[ex(i) for i in range(1000)], [ex(i) for i in range(1000, 2000)]]})
    folder = build("tfds", tmp_path, "dsprites_loc", tmp_path / "out")
    slices = json.loads((folder / "manifest.json").read_text())["splits"]
    assert (slices["val200"]["slice"], slices["test"]) == ("train[1600:1800]", {"slice": "train[1800:]", "images": 200})
    assert (folder / "train800.txt").read_text().splitlines()[31] == "images/train/000031.png 15"
    with Image.open(folder / "images/train/000001.png") as img:
        assert img.mode == "L" and img.getpixel((0, 0)) == 255
    text, problems = check_root(tmp_path / "out", ["dsprites_loc"], full=True)
    assert problems == 0, text


def _protobuf_example_class():
    """tf.train.Example built from tensorflow/core/example/{example,feature}.proto with the protobuf package."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(name="example.proto", package="tensorflow", syntax="proto3")
    T, L = descriptor_pb2.FieldDescriptorProto, descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    for name, typ in (("BytesList", T.TYPE_BYTES), ("FloatList", T.TYPE_FLOAT), ("Int64List", T.TYPE_INT64)):
        f.message_type.add(name=name).field.add(name="value", number=1, type=typ, label=L)
    feature = f.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for i, name in enumerate(("bytes_list", "float_list", "int64_list"), 1):
        feature.field.add(name=name, number=i, type=T.TYPE_MESSAGE, label=T.LABEL_OPTIONAL, oneof_index=0,
                          type_name=".tensorflow." + {"bytes_list": "BytesList", "float_list": "FloatList",
                                                      "int64_list": "Int64List"}[name])  # fmt: skip
    features = f.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=T.TYPE_MESSAGE, label=T.LABEL_OPTIONAL, type_name=".tensorflow.Feature")
    features.field.add(name="feature", number=1, type=T.TYPE_MESSAGE, label=L,
                       type_name=".tensorflow.Features.FeatureEntry")  # fmt: skip
    f.message_type.add(name="Example").field.add(name="features", number=1, type=T.TYPE_MESSAGE,
                                                 label=T.LABEL_OPTIONAL, type_name=".tensorflow.Features")  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def test_decoder_reads_what_protobuf_writes():
    """Cross-check with an independent encoder (skipped without the protobuf package)."""
    example = _protobuf_example_class()()
    feats = example.features.feature
    feats["image"].bytes_list.value.extend([b"\x89PNG\r\n", b""])
    feats["objects/location"].float_list.value.extend([0.5, -1.25, 23.0])
    feats["objects/type"].int64_list.value.extend([0, 7, -1, 1 << 40])
    feats["empty"].int64_list.SetInParent()
    got = parse_example(example.SerializeToString())
    assert got == {"image": [b"\x89PNG\r\n", b""], "objects/location": [0.5, -1.25, 23.0],
                   "objects/type": [0, 7, -1, 1 << 40], "empty": []}  # fmt: skip
