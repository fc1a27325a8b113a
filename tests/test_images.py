"""Image loading on awkward files, resizing like the release's thumbnail, and query crops."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tokenret.data import (
    ImageLoadError,
    ImageTooLargeError,
    RevisitedDataset,
    load_image,
    thumbnail_size,
    to_tensor,
)


def gradient(w=64, h=48):
    """A smooth RGB test picture (JPEG-friendly)."""
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    rgb = np.concatenate(
        [np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 90.0)], 2
    )
    return rgb.round().astype(np.uint8)


def pillow_thumbnail(img, side):
    """What the release does: ``thumbnail((S, S), ANTIALIAS)``, with the modern default reducing_gap off."""
    out = img.copy()
    out.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=None)
    return out


def png_with_header_size(path, width, height):
    """A tiny PNG whose header claims width x height pixels."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


# --- modes -------------------------------------------------------------------------------------------


def test_rgb_jpeg_is_decoded_unchanged(tmp_path):
    path = tmp_path / "rgb.jpg"
    Image.fromarray(gradient()).save(path, quality=95)
    img = load_image(path, max_size=None)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(path)))


def test_grayscale(tmp_path):
    grey = gradient()[..., 0]
    path = tmp_path / "grey.png"
    Image.fromarray(grey, mode="L").save(path)
    out = np.asarray(load_image(path))
    assert out.shape == (*grey.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_palette_with_transparency_composited_on_white(tmp_path):
    index = np.zeros((20, 30), dtype=np.uint8)
    index[:, 15:] = 1
    pal = Image.fromarray(index, mode="P")
    pal.putpalette([0, 0, 0, 200, 10, 20] + [0] * (254 * 3))
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    out = np.asarray(load_image(path))
    assert (out[:, :15] == 255).all()  # transparent black -> white
    assert (out[:, 15:] == [200, 10, 20]).all()


def test_rgba_alpha_blend(tmp_path):
    rgb = gradient(30, 20)
    alpha = np.zeros((20, 30), dtype=np.uint8)
    alpha[:, 10:20] = 128
    alpha[:, 20:] = 255
    path = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(path)
    out = np.asarray(load_image(path)).astype(int)
    a = alpha[..., None] / 255.0
    expected = rgb * a + 255 * (1 - a)
    assert np.abs(out - expected).max() <= 1
    assert (out[:, :10] == 255).all()
    np.testing.assert_array_equal(out[:, 20:], rgb[:, 20:])


def test_grey_with_alpha(tmp_path):
    la = np.dstack([np.full((8, 8), 40, np.uint8), np.tile(np.array([0, 255], np.uint8), (8, 4))])
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    out = np.asarray(load_image(path))
    assert (out[:, 0::2] == 255).all() and (out[:, 1::2] == 40).all()


def test_cmyk_jpeg(tmp_path):
    rgb = gradient()
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    out = load_image(path)
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out).astype(int) - rgb).mean() < 4


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 32 * 16).reshape(16, 32).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    out = np.asarray(load_image(path)).astype(int)
    assert np.abs(out[..., 1] - values / 257.0).max() <= 0.5 + 1e-9
    assert out.min() == 0 and out.max() == 255


# --- EXIF orientation ----------------------------------------------------------------------------


def test_exif_orientation_6_rotates(tmp_path):
    stored = np.zeros((40, 80, 3), dtype=np.uint8)
    stored[..., 2] = 255
    stored[:16, :16] = [255, 0, 0]  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rot.jpg"
    Image.fromarray(stored).save(path, quality=100, exif=exif)

    img = load_image(path, max_size=None)
    assert img.size == (40, 80)  # width and height swapped
    decoded = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(img), np.rot90(decoded, k=-1))
    top_right = np.asarray(img)[:12, -12:].astype(int)
    assert (top_right[..., 0] > 200).all() and (top_right[..., 2] < 60).all()

    raw = load_image(path, max_size=None, exif_transpose=False)
    assert raw.size == (80, 40)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(gradient(12, 7)).save(path, exif=exif)
    with Image.open(path) as im:
        expected = ImageOps.exif_transpose(im).convert("RGB")
    np.testing.assert_array_equal(np.asarray(load_image(path, max_size=None)), np.asarray(expected))


# --- broken files ------------------------------------------------------------------------------------


def test_truncated_jpeg(tmp_path):
    full = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(full)
    path = tmp_path / "cut.jpg"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageLoadError, match="truncated") as info:
        load_image(path)
    assert info.value.path == path and str(path) in str(info.value)


@pytest.mark.parametrize(
    "name, content",
    [("text.jpg", b"this is not an image\n"), ("empty.jpg", b""), ("junk.png", b"\x89PNG\r\n")],
)
def test_not_an_image(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value) and info.value.reason


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize("side", [100_000, 10_000])  # over 2x and between 1x and 2x Pillow's default limit
def test_decompression_bomb_is_an_error_not_a_warning(tmp_path, side):
    path = png_with_header_size(tmp_path / "bomb.png", side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLargeError) as info:
            load_image(path)
    assert isinstance(info.value, ImageLoadError) and str(path) in str(info.value)


def test_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(gradient(64, 48)).save(path)
    with pytest.raises(ImageTooLargeError, match="3072"):
        load_image(path, max_pixels=3000)
    assert load_image(path, max_pixels=3072).size == (64, 48)
    # A box reaching outside the image is refused (it was padded, and bounded by the limit, before).
    with pytest.raises(ImageLoadError, match="outside the image"):
        load_image(path, max_pixels=5000, box=(0, 0, 100, 100))
    assert load_image(path, max_pixels=3072, box=(0, 0, 64, 48), max_size=None).size == (64, 48)


@pytest.mark.parametrize(
    ("box", "ok"),
    [
        ((0, 0, 64, 48), True),
        ((-1, -1, 65, 49), True),  # one pixel of slack at each edge (a box drawn to the edge, rounded)
        ((10.2, 5.5, 30.7, 20.1), True),
        ((-1.5, 0, 30, 20), False),
        ((0, 0, 65.5, 48), False),
        ((900, 900, 5000, 5000), False),
        ((30, 10, 20, 40), False),  # x1 < x0
        ((10, 10, 10.4, 20), False),  # empty once rounded
        ((0, 0, float("nan"), 20), False),
    ],
)
def test_a_box_outside_the_image_is_refused_never_padded(tmp_path, box, ok):
    from tokenret.data.images import check_box

    path = tmp_path / "small.png"
    Image.fromarray(gradient(64, 48)).save(path)
    if ok:
        assert check_box(box, (64, 48)) == tuple(float(v) for v in box)
        img = load_image(path, max_size=None, box=box)
        x0, y0, x1, y1 = (round(v) for v in box)
        assert img.size == (x1 - x0, y1 - y0)
    else:
        with pytest.raises(ValueError, match=r"0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48"):
            check_box(box, (64, 48))
        with pytest.raises(ImageLoadError, match=r"small.png: a box is x0,y0,x1,y1"):
            load_image(path, max_size=None, box=box)


def test_error_survives_pickling(tmp_path):
    import pickle

    err = pickle.loads(pickle.dumps(ImageLoadError(tmp_path / "x.jpg", "broken")))
    assert err.reason == "broken" and err.path == tmp_path / "x.jpg"


# --- resizing ----------------------------------------------------------------------------------------


def test_thumbnail_size_matches_pillow():
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 900), (900, 1), (1024, 1024), (1025, 1024), (1023, 1025), (2000, 3), (3, 2000)]
    sizes += [tuple(int(v) for v in rng.integers(1, 1600, 2)) for _ in range(120)]
    bounds = [1024, 512.7, 300, 99.999, 1]
    for size in sizes:
        img = Image.new("L", size)
        for bound in bounds:
            ref = img.copy()
            ref.thumbnail((bound, bound), Image.Resampling.NEAREST, reducing_gap=None)  # size math only
            assert thumbnail_size(size, bound) == ref.size, (size, bound)


def test_database_image_resized_like_release(rparis6k_subset_dir):
    path = rparis6k_subset_dir / "jpg" / "paris_defense_000000.jpg"
    original = Image.open(path).convert("RGB")
    assert original.size == (1024, 768)
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(original))  # already <= 1024
    small = load_image(path, max_size=500)
    assert small.size == (500, 375)
    np.testing.assert_array_equal(np.asarray(small), np.asarray(pillow_thumbnail(original, 500)))


def test_never_enlarges(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(gradient(100, 50)).save(path)
    img = load_image(path, max_size=1024)
    assert img.size == (100, 50)
    np.testing.assert_array_equal(np.asarray(img), gradient(100, 50))


def test_float_box_is_rounded_like_pil(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((1000, 1100, 3), np.uint8)).save(path)
    # round-half-even: 136.5 -> 136, 648.5 -> 648; 34.1 -> 34, 955.7 -> 956
    img = load_image(path, max_size=None, box=(136.5, 34.1, 648.5, 955.7))
    assert img.size == (512, 922)


@pytest.mark.parametrize("max_size", [1024, 600])
def test_query_crop_then_scale(rparis6k_subset_dir, max_size):
    ds = RevisitedDataset.from_json(rparis6k_subset_dir / "gnd_rparis6k_subset.json")
    path, box = ds.query_path(0), ds.query_box(0)
    full = Image.open(path).convert("RGB")
    assert full.size == (837, 1024) and box == (8.0, 104.0, 707.0, 913.0)
    crop = full.crop(box)
    assert crop.size == (699, 809)
    out = load_image(path, max_size=max_size, box=box)
    # The crop keeps the scale it has inside the full image shrunk to max_size.
    side = max_size * max(crop.size) / max(full.size)
    assert max(out.size) == min(int(side), 809)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(pillow_thumbnail(crop, side)))


# --- tensor ------------------------------------------------------------------------------------------


def test_to_tensor_matches_torchvision():
    from torchvision.transforms import functional as F

    img = Image.fromarray(gradient(20, 10))
    t = to_tensor(img)
    assert t.shape == (3, 10, 20) and t.dtype == torch.float32
    expected = F.normalize(F.to_tensor(img), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(t, expected)
