"""core.data.decoders on single samples, in memory: which members decode to what, which are refused or dropped,
the pixel limit's edge, label parsing, and the reasons a skipped sample is counted under. (Shards, streams and
the video and audio decoders are tests/test_data_stream.py's.)"""

import io
import pickle
from unittest.mock import patch

import numpy as np
import PIL.EpsImagePlugin
import PIL.Image
import pytest
import torch
from test_data_stream import audio_bytes, npy_bytes

from core.data import decoders
from core.data.decoders import (
    RefusedSample,
    UndecodableSample,
    check_pixel_limit,
    decode_npy,
    decode_sample,
    decoded_whole,
    member_extension,
    new_array,
)


def encoded(image: PIL.Image.Image, fmt: str) -> bytes:
    """``image`` in any PIL mode (palette, 16 bit, ...), encoded as ``fmt``."""
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def sample(**members) -> dict:
    return {"__key__": "k", "__url__": "u", **members}


def test_the_pixel_limit_takes_exactly_the_limit_and_refuses_one_pixel_more(monkeypatch):
    """The limit is width x height, inclusive; Pillow's None turns the check off."""
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 110)
    check_pixel_limit(11, 10, "image")  # 110 pixels: at the limit
    with pytest.raises(PIL.Image.DecompressionBombError, match="image size 111x1 .111 pixels. exceeds the limit of 110"):
        check_pixel_limit(111, 1, "image")
    with pytest.raises(PIL.Image.DecompressionBombError):
        check_pixel_limit(12, 10, "frame")  # 22 as a sum, 120 as the product
    assert decode_sample(sample(png=encoded(PIL.Image.new("L", (11, 10)), "PNG")))["image"].size == (11, 10)
    with pytest.raises(UndecodableSample, match="could be decompression bomb") as error:
        decode_sample(sample(png=encoded(PIL.Image.new("L", (12, 10)), "PNG")))
    assert error.value.reason == "undecodable .png"
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)
    check_pixel_limit(100_000, 100_000, "image")


def test_every_image_extension_decodes_and_every_mode_comes_out_rgb():
    """Greyscale, palette and RGBA images come out as 3-channel RGB, as a batch of them must stack."""
    grey = PIL.Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    formats = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}
    for ext, fmt in formats.items():
        image = decode_sample(sample(**{ext: encoded(grey, fmt)}))["image"]
        assert image.mode == "RGB" and image.size == (8, 8), ext
    for mode in ("L", "P", "RGBA", "LA"):
        image = decode_sample(sample(png=encoded(grey.convert(mode), "PNG")))["image"]
        assert image.mode == "RGB", mode
        np.testing.assert_array_equal(np.asarray(image)[..., 1], np.asarray(grey))


def test_16_bit_greyscale_keeps_its_top_byte_not_its_bottom_one():
    """A ramp whose top and bottom bytes differ (tests/test_data_stream.py's 0..65535 ramp is k * 257: both bytes k)."""
    values = (np.arange(256, dtype=np.uint16) * 256 + 17).reshape(16, 16)  # top byte 0..255, bottom byte 17
    image = np.asarray(decode_sample(sample(png=encoded(PIL.Image.fromarray(values), "PNG")))["image"])
    assert image.shape == (16, 16, 3)
    np.testing.assert_array_equal(image[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))
    # A big-endian 16-bit image (mode I;16B, as a TIFF holds it) keeps its top byte too.
    big_endian = PIL.Image.frombytes("I;16B", (16, 16), values.astype(">u2").tobytes())
    top = [[big_endian.getpixel((x, y)) >> 8 for x in range(16)] for y in range(16)]
    assert len({v for row in top for v in row}) > 100  # a range, which Pillow's RGB conversion would clip to white
    with patch.object(PIL.Image, "open", lambda *_, **__: big_endian):
        np.testing.assert_array_equal(np.asarray(decode_sample(sample(png=b"16-bit"))["image"])[..., 0], top)


def test_an_image_member_is_read_only_as_the_formats_the_extensions_name(monkeypatch, tmp_path):
    """Pillow opens by content: a .png holding PostScript went to Ghostscript, a program run on the shard's
    bytes (a stand-in `gs` here records whether it ran). A .jpg holding a PNG still decodes."""
    grey = PIL.Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    assert decode_sample(sample(jpg=encoded(grey, "PNG")))["image"].size == (8, 8)
    ran = tmp_path / "gs-ran"
    gs = tmp_path / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setattr(PIL.EpsImagePlugin, "gs_binary", str(gs), raising=False)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
    for content in (eps, encoded(grey, "TIFF"), encoded(grey, "GIF")):
        with pytest.raises(UndecodableSample, match="cannot identify image file"):
            decode_sample(sample(png=content))
    assert not ran.exists()


def test_new_array_gives_the_decoded_array_in_the_dtype_asked_and_refuses_to_promise_no_copy():
    decode = lambda: torch.arange(3, dtype=torch.int16)  # noqa: E731
    for copy in (None, True):
        array = new_array(decode, None, copy, "audio")
        assert array.dtype == np.int16 and array.tolist() == [0, 1, 2]
    assert new_array(decode, np.float64, None, "audio").dtype == np.float64
    with pytest.raises(ValueError, match="np.asarray.audio. cannot avoid a copy"):
        new_array(decode, None, False, "audio")


def test_labels_are_ascii_digits_with_whitespace_zero_kept_negatives_unlabelled():
    assert decode_sample(sample(cls=b"0"))["label"] == 0
    assert decode_sample(sample(cls=b"\t12 \r\n"))["label"] == 12
    assert decode_sample(sample(cls=b"-1", txt=b"t")) == {"__key__": "k", "__url__": "u", "text": "t"}
    # Non-ASCII digits (Arabic-Indic 3), which int() would take from a str, and words are not labels.
    for bad in ("\u0663".encode(), b"three", b""):
        with pytest.raises(UndecodableSample, match="cannot decode member 'cls'") as error:
            decode_sample(sample(cls=bad))
        assert error.value.reason == "undecodable .cls"


def test_text_that_is_not_utf8_is_undecodable_not_replaced():
    assert decode_sample(sample(txt="é".encode()))["text"] == "é"
    with pytest.raises(UndecodableSample) as error:
        decode_sample(sample(txt=b"caf\xe9"))  # latin-1
    assert error.value.reason == "undecodable .txt"


def test_an_object_npy_is_refused_on_the_retry_after_cpythons_ast_error_too(monkeypatch):
    """The retry after the spurious SystemError loads with allow_pickle=False as the first try does."""
    payload = npy_bytes(np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        decode_npy(payload)
    real, calls = np.load, []

    def flaky(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=207, after=227)")
        return real(*args, **kwargs)

    monkeypatch.setattr(decoders.np, "load", flaky)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        decode_npy(payload)
    assert calls == [{"allow_pickle": False}] * 2


def test_every_pickle_extension_is_refused_whatever_its_case_or_other_members():
    payload = pickle.dumps({"weights": 1})
    for ext in ("pyd", "pickle", "pkl", "pth", "pt", "joblib", "dill"):
        for name in (ext, f"model.{ext.upper()}"):
            with pytest.raises(RefusedSample) as error:
                decode_sample(sample(**{name: payload, "cls": b"1", "txt": b"t"}))
            assert error.value.reason == f"refused .{ext} (pickle)", name
            assert not isinstance(error.value, UndecodableSample)  # counted as refused, not as undecodable


def test_the_last_extension_picks_the_decoder_and_unknown_members_anywhere_are_dropped():
    assert member_extension("a.b.TXT") == "txt" and member_extension("cls") == "cls"
    assert member_extension("weights.pt.txt") == "txt" and member_extension("scan.txt.pyd") == "pyd"
    decoded = decode_sample(sample(**{"tar.gz": b"?", "meta.b.txt": b"hi", "xyz": b"?", "cls": b"4"}))
    assert decoded == {"__key__": "k", "__url__": "u", "text": "hi", "label": 4}
    # Only names starting with two underscores are WebDataset's metadata; one underscore is a member.
    assert decode_sample({"__key__": "k", "__other__": "x", "_note.txt": b"n"}) == {"__key__": "k", "text": "n"}


def test_a_link_to_a_pickle_member_loses_its_sample_as_a_link_and_a_cut_sample_is_skipped():
    with pytest.raises(UndecodableSample, match="'k.pyd' is a symbolic link to '/x/k.pyd'") as error:
        decode_sample(sample(cls=b"1", __links__=[("k.pyd", "/x/k.pyd", "symbolic")]))
    assert error.value.reason == "link member" and "tar --dereference" in str(error.value)
    assert decode_sample(sample(cls=b"1", __links__=[("k.README", "../README", "symbolic")]))["label"] == 1
    with pytest.raises(UndecodableSample, match="read failed while this sample was being read") as error:
        decode_sample(sample(cls=b"1", __partial__=True))
    assert error.value.reason == "cut short"


def test_an_undecodable_member_is_counted_by_its_lowercase_extension():
    with pytest.raises(UndecodableSample, match="cannot decode member 'Photo.PNG'") as error:
        decode_sample(sample(**{"Photo.PNG": b"not an image", "cls": b"1"}))
    assert error.value.reason == "undecodable .png"
    assert isinstance(error.value, ValueError)  # SampleError is a ValueError, for callers that catch those


def test_a_lazily_decoded_member_is_named_and_counted_by_its_sample_and_extension():
    """An audio member's samples are decoded by the transform, long after decode_sample: a failure then
    still names the sample and counts under the member's extension."""
    audio = decode_sample(sample(**{"voice.WAV": audio_bytes(np.zeros((100, 1)), 8000, "WAV")}))["audio"]
    assert audio.source == "sample 'k' of 'u': member 'voice.WAV'" and audio.reason == "undecodable .wav"
    audio.data = b"RIFF, then nothing"  # what the transform meets when the samples turn out not to decode
    with pytest.raises(UndecodableSample, match="sample 'k' of 'u': member 'voice.WAV': cannot decode") as error:
        audio.samples()
    assert error.value.reason == "undecodable .wav"


def test_decoded_whole_decodes_audio_and_passes_everything_else_through():
    decoded = decode_sample(sample(wav=audio_bytes(np.zeros((100, 1)), 8000, "WAV"), cls=b"2"))
    whole = decoded_whole(decoded)
    assert isinstance(whole["audio"], torch.Tensor) and whole["audio"].shape == (1, 100)
    assert {k: v for k, v in whole.items() if k != "audio"} == {k: v for k, v in decoded.items() if k != "audio"}
