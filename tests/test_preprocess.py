"""Manifest-driven pre-processing: geometry, scaling, windowing, inversion, validation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_voi_lut

from edge_runtime.errors import BundleError, InputError
from edge_runtime.frames import Frame
from edge_runtime.preprocess import Preprocessor, sector_mask


def _frame(px: np.ndarray, **kw) -> Frame:
    return Frame(px, **kw)


def test_letterbox_round_trip_exact_to_the_pixel() -> None:
    # 240x320 -> 256x256: scale 0.8, content 192x256 centred (offset_y 32).
    img = np.zeros((240, 320), np.uint8)
    box = (45, 30, 170, 205)  # x0, y0, x1, y1 (exclusive), multiples of 5 -> integer in the tensor
    img[box[1]:box[3], box[0]:box[2]] = 255
    pre = Preprocessor({"resize": {"mode": "letterbox", "size": [256, 256], "interpolation": "area"}})
    x, m = pre(_frame(img, modality="US"))
    assert x.shape == (1, 1, 256, 256) and x.dtype == np.float32
    assert (m.offset_x, m.offset_y, m.content_size) == (0, 32, (192, 256))
    ys, xs = np.nonzero(x[0, 0] > 0.5)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]])
    np.testing.assert_array_equal(found, m.to_input(np.array([box])))
    np.testing.assert_array_equal(m.to_original(found), [box])
    # Padding rows hold pad_value (0) and the whole padded band is outside the content.
    assert np.all(x[0, 0, :32] == 0) and np.all(x[0, 0, 224:] == 0)


def test_letterbox_mapping_inverse_for_odd_sizes() -> None:
    pre = Preprocessor({"resize": {"mode": "letterbox", "size": [256, 256]}})
    m = pre.geometry(333, 517)
    boxes = np.array([[0, 0, 517, 333], [12.25, 100.5, 77.75, 300.0]])
    np.testing.assert_allclose(m.to_original(m.to_input(boxes)), boxes, atol=1e-9)
    # The full frame maps exactly onto the content region (edges onto pixel edges).
    np.testing.assert_allclose(m.to_input(boxes[:1])[0], m.content, atol=1e-9)


def test_bit_depth_scaling_8_12_16() -> None:
    for bits, dtype in ((8, np.uint8), (12, np.uint16), (16, np.uint16)):
        px = np.array([[0, 1, 2 ** bits - 1]], dtype)
        x, _ = Preprocessor({}, bits_stored=bits)(_frame(px, bits_stored=bits))
        np.testing.assert_allclose(x[0, 0], [[0, 1 / (2 ** bits - 1), 1]], rtol=1e-6)


def test_window_agrees_with_pydicom_apply_voi_lut_on_12_bit() -> None:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 4096, size=(64, 80), dtype=np.uint16)
    arr[0, :6] = [0, 599, 600, 1000, 1399, 4095]
    ds = Dataset()
    ds.BitsStored, ds.BitsAllocated, ds.PixelRepresentation = 12, 16, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 1000, 801
    want = apply_voi_lut(arr, ds) / 4095.0
    pre = Preprocessor({"window": {"center": 1000, "width": 801}}, modality=["DX"], bits_stored=12)
    x, _ = pre(_frame(arr, modality="DX", bits_stored=12))
    np.testing.assert_allclose(x[0, 0], want, atol=1e-6)
    assert x.min() == 0 and x.max() == 1


def test_monochrome1_is_inverted_and_can_be_kept() -> None:
    px = np.array([[0, 1000, 4095]], np.uint16)
    f = _frame(px, bits_stored=12, photometric="MONOCHROME1")
    x, _ = Preprocessor({})(f)
    np.testing.assert_allclose(x[0, 0], 1 - px / 4095.0, atol=1e-6)
    x, _ = Preprocessor({"invert_monochrome1": False})(f)
    np.testing.assert_allclose(x[0, 0], px / 4095.0, atol=1e-6)
    # Windowed: the manifest's window is in the model's polarity, so a MONOCHROME1 frame is inverted
    # first and meets the same window as its MONOCHROME2 twin (4095 - v), as a DICOM source's frames do
    # (windowed first, a MONOCHROME1 file's window selected the complementary intensities).
    twin = _frame(4095 - px, bits_stored=12)
    for window in ({"center": 1000, "width": 801}, {"center": 3000, "width": 1}):
        pre = Preprocessor({"window": window})
        np.testing.assert_array_equal(pre(f)[0], pre(twin)[0])
    x, _ = Preprocessor({"window": {"center": 1000, "width": 801}})(f)
    np.testing.assert_allclose(x[0, 0], [[1.0, 1.0, 0.0]], atol=1e-6)  # of 4095, 3095, 0


def test_normalise_pad_value_and_multiple_padding() -> None:
    px = np.full((100, 130), 255, np.uint8)
    spec = {"resize": {"mode": "none", "multiple": 16, "pad_value": 0.5},
            "normalize": {"mean": 0.5, "std": 0.25}}
    x, m = Preprocessor(spec)(_frame(px))
    assert x.shape == (1, 1, 112, 144) and m.content == (0, 0, 130, 100)
    assert np.all(x[0, 0, :100, :130] == 2.0)  # (1 - 0.5) / 0.25
    assert np.all(x[0, 0, 100:] == 0.0) and np.all(x[0, 0, :, 130:] == 0.0)  # pad 0.5 normalised


def test_color_handling() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    x, _ = Preprocessor({})(_frame(rgb, photometric="RGB", modality="US"))
    np.testing.assert_allclose(x[0, 0], cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) / 255.0, atol=1e-6)
    x, _ = Preprocessor({"color": "rgb", "normalize": {"mean": [0.1, 0.2, 0.3], "std": [1, 2, 4]}})(
        _frame(rgb, photometric="RGB"))
    for c, (mu, sd) in enumerate(((0.1, 1), (0.2, 2), (0.3, 4))):
        np.testing.assert_allclose(x[0, c], (rgb[..., c] / 255.0 - mu) / sd, atol=1e-6)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    x, _ = Preprocessor({"color": "rgb"})(_frame(gray))
    assert x.shape == (1, 3, 20, 30) and np.array_equal(x[0, 0], x[0, 2])


def test_stretch_mapping() -> None:
    pre = Preprocessor({"resize": {"mode": "stretch", "size": [128, 64]}})
    x, m = pre(_frame(np.zeros((256, 256), np.uint8)))
    assert x.shape == (1, 1, 128, 64) and (m.scale_x, m.scale_y) == (0.25, 0.5)
    np.testing.assert_allclose(m.to_original(np.array([[16, 32, 32, 64]])), [[64, 64, 128, 128]])


def test_unknown_keys_and_bad_values_are_bundle_errors() -> None:
    with pytest.raises(BundleError, match="colour"):
        Preprocessor({"colour": "gray"})
    with pytest.raises(BundleError, match="sizes"):
        Preprocessor({"resize": {"mode": "letterbox", "sizes": [1, 1]}})
    with pytest.raises(BundleError, match="letterbox/stretch"):
        Preprocessor({"resize": {"mode": "letterbox"}})
    with pytest.raises(BundleError, match="std"):
        Preprocessor({"normalize": {"std": 0}})
    with pytest.raises(BundleError, match="spatial size"):
        Preprocessor({"resize": {"mode": "letterbox", "size": [256, 256]}},
                     {"name": "image", "shape": [1, 1, 512, 512]})


def test_frames_of_another_modality_or_bit_depth_are_input_errors() -> None:
    pre = Preprocessor({}, modality=["DX", "CR"], bits_stored=12)
    with pytest.raises(InputError, match="modality"):
        pre(_frame(np.zeros((8, 8), np.uint16), modality="US", bits_stored=12))
    with pytest.raises(InputError, match="12-bit"):
        pre(_frame(np.zeros((8, 8), np.uint16), modality="DX", bits_stored=16))


def test_sector_mask_removes_annotations_outside_the_fan() -> None:
    img = np.zeros((200, 200), np.uint8)
    cv2.ellipse(img, (100, 10), (170, 170), 0, 50, 130, 120, -1)  # a sector
    cv2.putText(img, "MI 0.9", (5, 190), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1)
    mask = sector_mask(img)
    assert mask[150, 100] == 1 and mask[188, 10] == 0
    x, _ = Preprocessor({"sector_mask": {"threshold": 1}})(_frame(img))
    assert x[0, 0, 180:195, 0:60].max() == 0 and x[0, 0, 150, 100] > 0
    # A JPEG cine's black is rarely 0 (the real pydicom cine's is 1): the background level counts, or the
    # whole frame, text included, was "the sector".
    lifted = np.maximum(img, 1)
    mask = sector_mask(lifted)
    assert mask[150, 100] == 1 and mask[188, 10] == 0 and mask.mean() < 0.6


def test_sector_mask_of_a_monochrome1_frame_is_found_in_the_model_polarity() -> None:
    """A MONOCHROME1 frame (from the API or the wire) was sector-masked before its inversion: its
    white background was taken for tissue, the mask was the whole frame and the annotation text
    reached the model. Now it gives the tensor of its MONOCHROME2 twin."""
    img = np.zeros((200, 200), np.uint8)
    cv2.ellipse(img, (100, 10), (170, 170), 0, 50, 130, 120, -1)
    cv2.putText(img, "MI 0.9", (5, 190), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1)
    pre = Preprocessor({"sector_mask": {"threshold": 1}})
    m1, _ = pre(_frame(255 - img, photometric="MONOCHROME1"))
    twin, _ = pre(_frame(img))
    np.testing.assert_array_equal(m1, twin)
    assert m1[0, 0, 180:195, 0:60].max() == 0 and m1[0, 0, 150, 100] > 0


def test_a_float32_monochrome1_frame_must_say_its_bits() -> None:
    """Inverting is about 2**bits_stored - 1; a float32 frame that gave none was inverted about
    2**32 - 1 (float32's default) and reached the model as a tensor of about 1.0 everywhere."""
    px = np.array([[0.0, 1000.0, 4095.0]], np.float32)
    with pytest.raises(InputError, match="bits_stored of a float32 MONOCHROME1 frame"):
        Preprocessor({})(_frame(px, photometric="MONOCHROME1"))
    x, _ = Preprocessor({})(_frame(px, photometric="MONOCHROME1", bits_stored=12))
    np.testing.assert_allclose(x[0, 0], 1 - px / 4095.0, atol=1e-6)
    x, _ = Preprocessor({"invert_monochrome1": False})(_frame(px, photometric="MONOCHROME1"))  # not inverted


def test_sector_mask_keeps_a_field_of_view_that_reaches_the_frame_border() -> None:
    """A linear probe's image (or a frame cropped to the image) has tissue at its border: raising the
    threshold to the border's median zeroed 44% of a linear phantom's field of view."""
    from edge_runtime.phantoms import us_fan_mask, us_frame

    for geometry in ("linear", "sector"):
        fan = us_fan_mask(geometry=geometry) > 0
        px = us_frame(3, geometry=geometry).pixels
        # 8-bit, and the same image as 12-bit data in uint16 (full scale 4095, not 65535)
        for mask in (sector_mask(px) > 0, sector_mask(px.astype(np.uint16) * 16, 1, bits_stored=12) > 0):
            assert not (fan & ~mask).any(), (geometry, float((fan & ~mask).mean()))  # no tissue zeroed
            assert (mask & ~fan).mean() < 0.02, geometry  # and little outside the field of view kept


def test_window_width_1_is_a_threshold_as_pydicom_applies_it() -> None:
    """Width 1 used to pass validation and then divide by zero (w - 1) in the affine map. DICOM PS3.3
    C.11.2.1.2.1 makes it a step at center - 0.5, which pydicom's apply_voi_lut implements."""
    arr = np.array([[0, 99, 100, 101, 4095]], np.uint16)
    ds = Dataset()
    ds.BitsStored, ds.BitsAllocated, ds.PixelRepresentation = 12, 16, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 100, 1
    want = apply_voi_lut(arr, ds) / 4095.0
    x, _ = Preprocessor({"window": {"center": 100, "width": 1}})(_frame(arr, bits_stored=12))
    np.testing.assert_array_equal(x[0, 0], want)
    np.testing.assert_array_equal(x[0, 0], [[0, 0, 1, 1, 1]])
    inverted, _ = Preprocessor({"window": {"center": 100, "width": 1}, "normalize": {"mean": 0.5, "std": 0.5}})(
        _frame(arr, bits_stored=12, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverted[0, 0], [[1, 1, 1, 1, -1]])  # the threshold of 4095 - v
    for bad in ({"center": 100, "width": 0.5}, {"center": 100, "width": float("nan")},
                {"center": float("inf"), "width": 10}, {"center": "a", "width": 10}, {"center": 100}):
        with pytest.raises(BundleError, match="preprocess.window"):
            Preprocessor({"window": bad})


def test_float_frames_out_of_range_are_refused_without_a_window() -> None:
    """Signed or rescaled values reached the model in a wrong range (e.g. -0.5..0.5 for a 12-bit
    model): a float32 frame is read as 0..2**bits-1 only when its values are in that range."""
    ok = np.array([[0.0, 2047.5, 4095.0]], np.float32)
    x, _ = Preprocessor({}, bits_stored=12)(_frame(ok, bits_stored=12))
    np.testing.assert_allclose(x[0, 0], ok / 4095.0, atol=1e-6)
    for values in ([[-2048.0, 0.0, 2047.0]], [[0.0, 5000.0, 1.0]], [[0.0, float("nan"), 1.0]]):
        with pytest.raises(InputError, match=r"expected float32 pixel values in 0\.\.4095.*found"):
            Preprocessor({}, bits_stored=12)(_frame(np.array(values, np.float32), bits_stored=12))
    # a window defines the mapping of any values (e.g. Hounsfield units)
    hu = np.array([[-1000.0, 40.0, 1000.0]], np.float32)
    x, _ = Preprocessor({"window": {"center": 40, "width": 401}})(_frame(hu, bits_stored=12))
    np.testing.assert_allclose(x[0, 0], [[0.0, 0.5 + 0.5 / 400, 1.0]], atol=1e-6)


def test_integer_frames_above_their_bits_stored_are_refused() -> None:
    """uint16 storage labelled 12-bit holding 16-bit values (or overlay bits in the high bits) would be read
    as pixels brighter than the detector can produce: refused, as float frames out of range are."""
    ok = np.array([[0, 2048, 4095]], np.uint16)
    x, _ = Preprocessor({}, bits_stored=12)(_frame(ok, bits_stored=12))
    np.testing.assert_allclose(x[0, 0], ok / 4095.0, atol=1e-6)
    with pytest.raises(InputError, match=r"expected uint16 pixel values in 0\.\.4095 \(bits_stored 12\), "
                                         r"found 'a maximum of 65535'"):
        Preprocessor({}, bits_stored=12)(_frame(np.array([[0, 65535, 1]], np.uint16), bits_stored=12))
    with pytest.raises(InputError, match=r"in 0\.\.127 .*maximum of 128"):
        Preprocessor({})(_frame(np.array([[0, 128]], np.uint8), bits_stored=7))
    x, _ = Preprocessor({})(_frame(np.array([[0, 65535]], np.uint16), bits_stored=16))  # full width: no check
    assert x.max() == 1.0


def test_zero_size_frames_are_input_errors() -> None:
    for shape in ((0, 5), (5, 0), (0, 0, 3)):
        with pytest.raises(InputError, match=r"at least one pixel.*found \("):
            _frame(np.zeros(shape, np.uint8), photometric="RGB" if len(shape) == 3 else "MONOCHROME2")


def test_sector_mask_on_an_rgb_bundle_masks_every_channel() -> None:
    """color: rgb with sector_mask used to run findContours on a 3-channel image (cv2.error)."""
    grey = np.zeros((200, 200), np.uint8)
    cv2.ellipse(grey, (100, 10), (170, 170), 0, 50, 130, 120, -1)  # a sector
    cv2.putText(grey, "MI 0.9", (5, 190), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1)
    rgb = np.stack([grey, grey // 2, grey // 3], axis=-1)
    rgb[100:110, 95:105] = (200, 30, 10)  # a colour Doppler patch inside the fan
    x, _ = Preprocessor({"color": "rgb", "sector_mask": {"threshold": 1}})(_frame(rgb, photometric="RGB", modality="US"))
    mask = sector_mask(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    for c in range(3):
        np.testing.assert_allclose(x[0, c], rgb[..., c] * mask / 255.0, atol=1e-6)
        assert x[0, c, 180:195, 0:60].max() == 0  # the text outside the fan, in every channel
    np.testing.assert_allclose(x[0, :, 105, 100], np.array([200, 30, 10]) / 255.0, atol=1e-6)


def test_reused_tensor_is_rewritten_whole_and_one_per_thread() -> None:
    import threading

    spec = {"resize": {"mode": "letterbox", "size": [64, 64], "pad_value": 0.25}}
    fresh, reuse = Preprocessor(spec), Preprocessor(spec, reuse_tensor=True)
    wide, tall = np.full((32, 64), 200, np.uint8), np.full((64, 32), 100, np.uint8)
    a, _ = reuse(_frame(wide, modality="US"))
    b, _ = reuse(_frame(tall, modality="US"))
    assert b is a  # the same buffer, overwritten ...
    np.testing.assert_array_equal(b, fresh(_frame(tall, modality="US"))[0])  # ... content and padding alike
    assert fresh(_frame(wide, modality="US"))[0] is not fresh(_frame(wide, modality="US"))[0]
    other: list[np.ndarray] = []
    t = threading.Thread(target=lambda: other.append(reuse(_frame(wide, modality="US"))[0]))
    t.start()
    t.join()
    assert other[0] is not a
    np.testing.assert_array_equal(a, fresh(_frame(tall, modality="US"))[0])  # the other thread left ours alone


def test_a_stretch_that_shrinks_one_axis_and_enlarges_the_other_averages_the_shrinking_one() -> None:
    """100x2000 (an M-mode strip) to 256x256: OpenCV's area mode with one axis enlarging interpolates
    without averaging, and a 2-px line vanished at 4 of 8 positions (peak 0) or kept full brightness."""
    pre = Preprocessor({"resize": {"mode": "stretch", "size": [256, 256]}})
    for x_line in range(1000, 1008):
        px = np.zeros((100, 2000), np.uint8)
        px[:, x_line:x_line + 2] = 255
        x, _ = pre(_frame(px))
        assert abs(x[0, 0].sum() / 256 - 2 / 7.8125) < 0.01, x_line  # the line's mass, on every row
        assert 0.15 < x[0, 0].max() <= 0.26, x_line


def test_a_frame_of_the_other_polarity_is_refused_when_the_model_does_not_invert_it() -> None:
    """invert_monochrome1: false ran MONOCHROME1 frames through a MONOCHROME2 model as they were (the
    anatomy inverted: 7 detections against the twin's 4) while calibration refused them."""
    px = np.array([[0, 1000, 4095]], np.uint16)
    m1 = _frame(px, bits_stored=12, photometric="MONOCHROME1")
    with pytest.raises(InputError, match=r"expected a MONOCHROME2 frame .*invert_monochrome1 false.*'MONOCHROME1'"):
        Preprocessor({"invert_monochrome1": False}, photometric="MONOCHROME2")(m1)
    with pytest.raises(InputError, match="expected a MONOCHROME1 frame"):
        Preprocessor({"invert_monochrome1": False}, photometric="MONOCHROME1")(_frame(px, bits_stored=12))
    Preprocessor({}, photometric="MONOCHROME2")(m1)  # inverted: taken
    Preprocessor({"invert_monochrome1": False}, photometric="MONOCHROME1")(m1)  # the model's own polarity
    with pytest.raises(BundleError, match="invert_monochrome1: expected false for a MONOCHROME1 model"):
        Preprocessor({}, photometric="MONOCHROME1")  # it would get its own polarity inverted
