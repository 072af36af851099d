"""Phantom physics and ground truth: speckle statistics, dose scaling, geometry, boxes, determinism."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from edge_runtime import phantoms as P
from edge_runtime.errors import InputError

SMALL = (256, 256)  # enough for statistics, 4x cheaper than the default


def bbox(mask: np.ndarray) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def check_truth(frame, labels: set[str]) -> None:
    t = frame.truth
    h, w = frame.pixels.shape
    assert t.masks is not None and t.masks.dtype == bool and t.masks.shape == (len(t.boxes), h, w)
    assert t.boxes.dtype == np.float32 and set(t.labels) <= labels
    for box, mask in zip(t.boxes, t.masks):
        assert mask.any()
        assert list(box) == bbox(mask)  # tight: exactly the mask's bounding box
        assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h


# ---------------------------------------------------------------- ultrasound

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_envelope_is_rayleigh(seed: int) -> None:
    env = P.us_envelope(seed, size=SMALL)
    assert env.shape == SMALL and env.dtype == np.float32 and env.min() >= 0
    snr = env.mean() / env.std()  # fully developed speckle: sqrt(pi / (4 - pi)) = 1.913
    assert 1.75 < snr < 2.05, snr
    intensity = env.astype(np.float64) ** 2  # exponential: E[I^2] / E[I]^2 = 2
    assert 1.8 < (intensity ** 2).mean() / intensity.mean() ** 2 < 2.2
    # Speckle has a grain (the PSF), not white noise: neighbours along a line are correlated.
    lateral = np.corrcoef(env[:, :-1].ravel(), env[:, 1:].ravel())[0, 1]
    assert lateral > 0.3


@pytest.mark.parametrize("geometry", P.GEOMETRIES)
def test_clean_is_the_mean_of_log_speckle(geometry: str) -> None:
    # Log-compressed fully developed speckle: std 5.57 dB (~21-28 grey levels over 50-60 dB),
    # centred on the speckle-free image (a little less after scan conversion and clipping at 0).
    f = P.us_frame(1, geometry=geometry, n_lesions=(0, 0))
    clean = f.truth.clean.astype(float)
    keep = P.us_fan_mask(geometry=geometry) & (clean > 60) & (clean < 200)
    speckle = (f.pixels - clean)[keep]
    assert abs(speckle.mean()) < 2.5 and 17 < speckle.std() < 30, (speckle.mean(), speckle.std())


@pytest.mark.parametrize("geometry", P.GEOMETRIES)
def test_us_frame_format(geometry: str) -> None:
    f = P.us_frame(3, geometry=geometry, seq=7, stream_id="probe-a")
    assert f.pixels.dtype == np.uint8 and f.pixels.shape == (512, 512)
    assert (f.modality, f.photometric, f.bits_stored, f.source) == ("US", "MONOCHROME2", 8, "phantom:us")
    assert (f.seq, f.stream_id) == (7, "probe-a")
    assert f.pixel_spacing is not None and all(0.01 < s < 1.0 for s in f.pixel_spacing)
    assert f.truth is not None and f.truth.clean.dtype == np.uint8 and f.truth.clean.shape == f.pixels.shape
    assert 1 <= len(f.truth.boxes) <= 3
    check_truth(f, {"cyst", "solid"})
    fan = P.us_fan_mask(geometry=geometry)
    tissue = f.pixels[fan]
    assert 40 < tissue.mean() < 180 and tissue.std() > 15  # mid-grey, speckled


def test_sector_is_zero_outside_the_fan() -> None:
    fan = P.us_fan_mask()
    assert fan[256, 256] and not fan[0, 0] and not fan[0, 511] and not fan[511, 0] and not fan[511, 511]
    assert 0.3 < fan.mean() < 0.8
    for seed in range(3):
        f = P.us_frame(seed)
        assert not f.pixels[~fan].any() and not f.truth.clean[~fan].any()
        assert (f.pixels[fan] > 0).mean() > 0.7  # anechoic cysts and deep shadows may be black
        for mask in f.truth.masks:
            assert not (mask & ~fan).any()
    assert P.us_fan_mask(geometry="linear").all()


@pytest.mark.parametrize("geometry", P.GEOMETRIES)
def test_lesion_echoes_and_posterior_effects(geometry: str) -> None:
    # Lesions are drawn last from the anatomy stream: the same seed without lesions is the background.
    fan = P.us_fan_mask(geometry=geometry)
    cysts = shadows = 0
    for seed in range(10):
        bare = P.us_frame(seed, geometry=geometry, n_lesions=(0, 0))
        f = P.us_frame(seed, geometry=geometry, n_lesions=(1, 1))
        assert len(bare.truth.boxes) == 0 and len(f.truth.boxes) == 1
        diff = f.truth.clean.astype(float) - bare.truth.clean
        (x0, _, x1, y1), label, mask = f.truth.boxes[0].astype(int), f.truth.labels[0], f.truth.masks[0]
        assert np.abs(diff[mask]).mean() > 3  # every lesion shows against its background
        below = diff[y1 + 4:y1 + 24, x0 + (x1 - x0) // 4:x1 - (x1 - x0) // 4]
        if label != "cyst":
            shadows += below.size > 50 and below.mean() < -20  # strongly attenuating masses shadow
            continue
        cysts += 1
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~mask & fan
        assert f.truth.clean[mask].mean() + 30 < f.truth.clean[ring].mean()  # anechoic
        assert f.pixels[mask].mean() + 30 < f.pixels[ring].mean()
        if below.size > 50:
            assert below.mean() > 3  # posterior acoustic enhancement
    assert cysts >= 2 and shadows >= 1


def test_us_determinism() -> None:
    a, b, c = P.us_frame(11), P.us_frame(11), P.us_frame(12)
    assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.truth.clean, b.truth.clean)
    assert np.array_equal(a.truth.boxes, b.truth.boxes) and a.truth.labels == b.truth.labels
    assert not np.array_equal(a.pixels, c.pixels)
    g1, g2 = P.us_frame(np.random.default_rng(5)), P.us_frame(np.random.default_rng(5))
    assert np.array_equal(g1.pixels, g2.pixels)
    assert np.array_equal(P.us_envelope(4, size=SMALL), P.us_envelope(4, size=SMALL))
    assert not np.array_equal(P.us_envelope(4, size=SMALL), P.us_envelope(5, size=SMALL))


@pytest.mark.parametrize("geometry", P.GEOMETRIES)
def test_us_cine_moves_smoothly(geometry: str) -> None:
    frames = list(P.us_cine(21, 30, size=SMALL, geometry=geometry, fps=30.0))
    assert [f.seq for f in frames] == list(range(30))
    first = P.us_frame(21, size=SMALL, geometry=geometry)
    assert np.array_equal(frames[0].pixels, first.pixels)  # frame 0 is the single frame of the seed
    fan = P.us_fan_mask(SMALL, geometry)
    step = [np.corrcoef(a.pixels[fan], b.pixels[fan])[0, 1] for a, b in itertools.pairwise(frames)]
    far = np.corrcoef(frames[0].pixels[fan], frames[-1].pixels[fan])[0, 1]
    assert all(0.5 < r < 0.999 for r in step)  # frames differ, speckle partly persists...
    assert far < np.mean(step) - 0.1  # ...and decorrelates over time
    # Lesions keep their identity and glide: centres move < 3 px per frame, and do move.
    counts = {len(f.truth.boxes) for f in frames}
    assert len(counts) == 1, counts
    centres = np.stack([(f.truth.boxes[:, :2] + f.truth.boxes[:, 2:]) / 2 for f in frames])
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=2)
    assert steps.max() < 3.0 and np.linalg.norm(centres[-1] - centres[0], axis=1).max() > 1.0
    for f in frames[::7]:
        check_truth(f, {"cyst", "solid"})
        assert not f.pixels[~fan].any()


def test_us_bad_arguments() -> None:
    with pytest.raises(InputError, match="geometry"):
        P.us_frame(0, geometry="convex-ish")
    with pytest.raises(InputError, match="height and width"):
        P.us_frame(0, size=(8, 8))
    with pytest.raises(InputError, match="n_lesions"):
        P.us_frame(0, n_lesions=(3, 1))
    with pytest.raises(InputError, match="seed"):
        P.us_frame(-1)


# ---------------------------------------------------------------- X-ray

def test_xr_frame_format() -> None:
    f = P.xr_frame(3, n_nodules=(2, 3), seq=4)
    assert f.pixels.dtype == np.uint16 and f.pixels.shape == (512, 512) and f.pixels.max() <= 4095
    assert (f.modality, f.photometric, f.bits_stored, f.source) == ("DX", "MONOCHROME2", 12, "phantom:xr")
    assert f.seq == 4 and f.pixel_spacing is not None and f.pixel_spacing[0] > 0
    clean = f.truth.clean
    assert clean.dtype == np.uint16 and clean.shape == f.pixels.shape and clean.max() <= 4095
    assert 2 <= len(f.truth.boxes) <= 3
    check_truth(f, {"nodule"})
    # Bright = attenuating: the spine/mediastinum column outshines the lung fields and the air.
    mid, lung, air = clean[200:300, 246:266].mean(), clean[200:300, 130:170].mean(), clean[500:, :5].mean()
    assert mid > lung + 300 and lung > air + 300
    assert clean.max() - clean.min() > 2500  # uses the 12-bit range


def test_xr_dose_keeps_anatomy_and_scales_noise() -> None:
    frames = {d: P.xr_frame(8, dose=d, n_nodules=(3, 3)) for d in (1.0, 0.25, 0.1)}
    ref = frames[1.0].truth
    var = {}
    for dose, f in frames.items():
        assert np.array_equal(f.truth.clean, ref.clean) and np.array_equal(f.truth.boxes, ref.boxes)
        noise = f.pixels.astype(np.float64) - f.truth.clean
        var[dose] = noise.var()
        predicted = P.xr_noise_variance(f.truth.clean, dose).mean()  # Poisson + electronic model
        assert 0.9 < var[dose] / predicted < 1.15, (dose, var[dose], predicted)
    # Quantum noise: variance ~ 1/dose; the electronic floor adds a little at low dose.
    expected_ratio = P.xr_noise_variance(ref.clean, 0.25).mean() / P.xr_noise_variance(ref.clean, 1.0).mean()
    assert 4.0 <= expected_ratio < 4.6
    assert abs(var[0.25] / var[1.0] - expected_ratio) < 0.25
    # In the lungs (many quanta) the electronic floor is negligible: the ratio is the dose ratio.
    lungs = (ref.clean > 1000) & (ref.clean < 1500)
    lung_var = {d: (f.pixels.astype(np.float64) - f.truth.clean)[lungs].var() for d, f in frames.items()}
    assert 3.6 < lung_var[0.25] / lung_var[1.0] < 4.4
    assert 9.0 < lung_var[0.1] / lung_var[1.0] < 11.0


def test_xr_nodules_are_soft_blobs_inside_their_boxes() -> None:
    for seed in range(4):
        bare = P.xr_frame(seed, n_nodules=(0, 0))
        f = P.xr_frame(seed, n_nodules=(3, 3))
        assert len(bare.truth.boxes) == 0 and len(f.truth.boxes) >= 1
        check_truth(f, {"nodule"})
        added = f.truth.clean.astype(np.int32) - bare.truth.clean
        inside = f.truth.masks.any(axis=0)
        assert not added[~inside].any()  # nothing outside the masks: boxes bound all that changed
        for (x0, y0, x1, y1), mask in zip(f.truth.boxes.astype(int), f.truth.masks):
            assert 8 <= x1 - x0 <= 42  # radius 4..20 px at 512
            assert added[mask].max() > 40  # visible contrast
            centre = added[(y0 + y1) // 2, (x0 + x1) // 2]
            assert centre >= np.percentile(added[mask], 90)  # peaked in the middle, soft towards the rim


def test_xr_determinism_and_sequence() -> None:
    a, b, c = P.xr_frame(30, dose=0.5), P.xr_frame(30, dose=0.5), P.xr_frame(31, dose=0.5)
    assert np.array_equal(a.pixels, b.pixels) and not np.array_equal(a.pixels, c.pixels)
    frames = list(P.xr_sequence(30, 12, dose=0.5, size=SMALL))
    assert [f.seq for f in frames] == list(range(12))
    single = P.xr_frame(30, dose=0.5, size=SMALL)
    assert np.array_equal(frames[0].pixels, single.pixels)
    again = list(P.xr_sequence(30, 12, dose=0.5, size=SMALL))
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(frames, again))
    for f, g in itertools.pairwise(frames):
        noise_f = f.pixels.astype(np.int32) - f.truth.clean
        noise_g = g.pixels.astype(np.int32) - g.truth.clean
        assert abs(np.corrcoef(noise_f.ravel(), noise_g.ravel())[0, 1]) < 0.05  # fresh noise
        motion = np.abs(f.truth.clean.astype(np.int32) - g.truth.clean).mean()
        assert motion < 40  # slight motion only
        check_truth(g, {"nodule"})
    assert not np.array_equal(frames[0].truth.clean, frames[-1].truth.clean)  # the patient moves
    with pytest.raises(InputError, match="dose"):
        P.xr_frame(0, dose=0.0)
