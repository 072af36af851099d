"""Synthetic ultrasound and X-ray frames with ground truth, deterministic from a seed on one machine.

Deterministic per CPU instruction set, not across them: numpy's and OpenCV's SIMD kernels round
differently (AVX2 vs AVX-512), moving a few pixels per frame by one level, so hashes of frames
made on another CPU differ (metrics do not move measurably).

Ultrasound (B-mode): tissue reflectivity (layers, smooth texture, lesions) is attenuated along each
beam, multiplied by complex (IQ) Gaussian scatterers and filtered with a separable Gaussian point
spread function in beam coordinates (depth x line; the beam widens with depth); specular interfaces
add a coherent echo and the receiver adds noise. The magnitude is the envelope, which is time-gain
compensated, log compressed to uint8 over a 50-60 dB dynamic range and scan converted (cv2.remap,
maps cached per size and geometry). A sector (curvilinear) probe's fan comes from a virtual apex
above the image; everything outside it is 0. Cysts barely attenuate, so the tissue behind them comes
out brighter (posterior enhancement); strongly attenuating solid masses leave a shadow.

X-ray: a chest-like map of line integrals mu (body, lungs, heart, mediastinum, spine, ribs,
clavicles, lung markings) plus nodules as soft blobs (projected spheres with a softened rim). Detector counts are
Poisson(N0 * dose * exp(-mu)) plus Gaussian electronic noise; the displayed value is the log
(bright = attenuating) stored 12-bit in uint16. The clean reference is the infinite-dose image.

Anatomy and noise come from separate RNG streams, so one seed gives the same anatomy at every dose
and the first frame of a cine equals the single frame of the same seed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from .errors import InputError, expected
from .frames import Frame, GroundTruth

GEOMETRIES = ("sector", "linear")

# X-ray detector model (public so tests and benchmarks can predict the noise).
XR_PHOTONS = 25_000.0  # mean quanta per pixel behind no attenuation at dose 1.0
XR_ELECTRONIC_NOISE = 4.0  # std of the additive electronic noise, in quanta
XR_GAIN = 600.0  # stored value per unit of mu (line integral)
XR_OFFSET = 100.0  # stored value of unattenuated air
XR_BITS = 12
US_MODALITY, XR_MODALITY = "US", "DX"  # what the frames state (DICOM Modality codes)
XR_FPS = 15.0  # frame rate assumed for the fluoroscopy-like sequence's breathing motion
# Below this many expected quanta the exact Poisson sampler is used; above it the normal
# approximation with the same mean and variance (skewness < 0.1), several times cheaper.
_POISSON_EXACT_BELOW = 100.0

_EULER_GAMMA = 0.5772156649  # -E[ln I] for exponential intensity of unit mean (speckle)
_NP_PER_DB = math.log(10.0) / 20.0  # amplitude dB -> nepers


# ---------------------------------------------------------------- shared helpers

def _streams(seed: int | np.random.Generator, n: int) -> list[np.random.Generator]:
    """Independent child generators: [anatomy, motion, noise, ...], stable for a given seed."""
    if isinstance(seed, np.random.Generator):
        entropy = int(seed.integers(0, 2**63))
    elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0:
        entropy = int(seed)
    else:
        raise InputError(expected("seed as a non-negative int or numpy Generator", seed))
    return [np.random.default_rng(s) for s in np.random.SeedSequence(entropy).spawn(n)]


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(expected("size as (height, width)", size)) from None
    if not (64 <= h <= 8192 and 64 <= w <= 8192):
        raise InputError(expected("height and width in 64..8192", size))
    return h, w


def _check_range(bounds: tuple[int, int], what: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in bounds)
    except (TypeError, ValueError):
        raise InputError(expected(f"{what} as (min, max)", bounds)) from None
    if not 0 <= lo <= hi <= 16:
        raise InputError(expected(f"{what} with 0 <= min <= max <= 16", bounds))
    return lo, hi


def _check_frames(n_frames: int) -> int:
    if not isinstance(n_frames, (int, np.integer)) or n_frames < 0:
        raise InputError(expected("n_frames as a non-negative int", n_frames))
    return int(n_frames)


def _truth(masks: list[np.ndarray], labels: list[str], clean: np.ndarray, shape: tuple[int, int]) -> GroundTruth:
    """Ground truth whose boxes are exactly the masks' bounding boxes (x1/y1 exclusive)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        rows = np.flatnonzero(m.any(axis=1))
        cols = np.flatnonzero(m.any(axis=0))
        boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    stack = np.stack(masks) if masks else np.zeros((0, *shape), bool)
    return GroundTruth(boxes=boxes, labels=labels, masks=stack, clean=clean)


# ---------------------------------------------------------------- ultrasound geometry

@dataclass(frozen=True)
class _UsGeometry:
    """Beam grid (rows = depth samples, columns = scan lines) and its scan conversion to pixels."""

    kind: str
    height: int
    width: int
    n_r: int
    n_l: int
    mm_per_px: float
    apex: tuple[float, float]  # virtual apex (x, y) of a sector, in pixels
    r_min: float  # px from the apex to the first depth sample (sector)
    dr: float  # px per depth sample
    theta_max: float  # half the fan angle, radians (sector)
    dl: float  # radians per line (sector) / px per line (linear)
    grid_x: np.ndarray  # (n_r, n_l) pixel x of each beam sample
    grid_y: np.ndarray
    map1: np.ndarray  # fixed-point remap maps, beam grid -> image
    map2: np.ndarray
    fan: np.ndarray  # bool (H, W): imaged region
    # PSF: unit-L2 Gaussian kernels, so unit-variance scatterers give unit mean intensity. The beam
    # widens with depth: one lateral kernel per band of depth rows (row0, row1, kernel).
    psf_ax: np.ndarray
    psf_lat: tuple[tuple[int, int, np.ndarray], ...]
    alpha_np: float  # round-trip tissue attenuation, nepers of amplitude per depth sample
    line_sigma: float  # px: thickness (Gaussian sigma) of specular interfaces
    coherent_gain: np.ndarray  # (n_r, 1): a coherent reflector of unit peak -> unit peak echo

    def to_grid(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates -> fractional (row, line) indices of the beam grid."""
        return _to_grid(self.kind, self.apex, self.r_min, self.dr, self.theta_max, self.dl, x, y)


def _to_grid(kind: str, apex: tuple[float, float], r_min: float, dr: float, theta_max: float, dl: float,
             x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if kind == "linear":
        return y / dr, x / dl
    dx, dy = x - apex[0], y - apex[1]
    return (np.sqrt(dx * dx + dy * dy) - r_min) / dr, (np.arctan2(dx, dy) + theta_max) / dl


def _kernel(sigma: float) -> np.ndarray:
    half = max(1, math.ceil(3.0 * sigma))
    x = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return (g / np.sqrt((g * g).sum())).astype(np.float32).reshape(-1, 1)


_ATTENUATION_DB_CM_MHZ = 0.5  # soft tissue, one way


@lru_cache(maxsize=16)
def _us_geometry(height: int, width: int, kind: str) -> _UsGeometry:
    if kind == "sector":  # curvilinear abdominal probe: 60 degree fan, 15 cm deep, 3.5 MHz
        theta_max = math.radians(30.0)
        apex = ((width - 1) / 2.0, -0.1 * height)
        r_min = -apex[1] + 1.0
        r_max = min((width / 2.0 - 2.0) / math.sin(theta_max), height - 2.0 - apex[1])
        n_r, n_l = round(r_max - r_min) + 1, max(64, 3 * width // 8)  # >= 2 lines per beam sigma
        dr, dl = (r_max - r_min) / (n_r - 1), 2.0 * theta_max / (n_l - 1)
        mm_per_px, freq, sigma_ax_mm = 150.0 / (r_max - r_min), 3.5, 0.45
        r = (r_min + dr * np.arange(n_r, dtype=np.float32))[:, None]
        th = (-theta_max + dl * np.arange(n_l, dtype=np.float32))[None, :]
        grid_x = (apex[0] + r * np.sin(th)).astype(np.float32)
        grid_y = (apex[1] + r * np.cos(th)).astype(np.float32)
        # Beam sigma 0.7 mm near the probe widening to ~2 mm at 15 cm, in lines at each band's depth.
        bands = []
        for r0, r1 in itertools.pairwise(np.linspace(0, n_r, 9).astype(int)):
            depth_px = dr * (r0 + r1) / 2.0
            sigma_mm = 0.7 + 0.009 * depth_px * mm_per_px
            bands.append((int(r0), int(r1), sigma_mm / mm_per_px / ((r_min + depth_px) * dl)))
    elif kind == "linear":  # linear array: 40 mm deep, 7.5 MHz, beam grid at half the image resolution
        theta_max, apex, r_min = 0.0, (0.0, 0.0), 0.0
        n_r, n_l = max(64, height // 2), max(64, width // 2)
        dr, dl = (height - 1) / (n_r - 1), (width - 1) / (n_l - 1)
        mm_per_px, freq, sigma_ax_mm = 40.0 / height, 7.5, 0.16
        grid_y, grid_x = np.meshgrid(dr * np.arange(n_r, dtype=np.float32),
                                     dl * np.arange(n_l, dtype=np.float32), indexing="ij")
        bands = [(0, n_r, 0.28 / (mm_per_px * dl))]
    else:
        raise InputError(expected(f"geometry in {GEOMETRIES}", kind))
    psf_ax = _kernel(sigma_ax_mm / (mm_per_px * dr))
    psf_lat = tuple((r0, r1, _kernel(max(0.8, sig))) for r0, r1, sig in bands)
    sample_cm = mm_per_px * dr / 10.0
    alpha_np = 2.0 * _ATTENUATION_DB_CM_MHZ * freq * sample_cm * _NP_PER_DB
    # Scan conversion: each pixel looks up its (row, line); pixels outside the fan point far outside
    # the grid so BORDER_CONSTANT makes them exactly 0.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    row, col = _to_grid(kind, apex, r_min, dr, theta_max, dl, xs, ys)
    fan = (row >= -1e-3) & (row <= n_r - 1 + 1e-3) & (col >= -1e-3) & (col <= n_l - 1 + 1e-3)
    row = np.where(fan, np.clip(row, 0, n_r - 1), -100.0).astype(np.float32)
    col = np.where(fan, np.clip(col, 0, n_l - 1), -100.0).astype(np.float32)
    map1, map2 = cv2.convertMaps(col, row, cv2.CV_16SC2)
    # Specular lines at least one beam sample thick (thinner ones alias into dashes), and the gain
    # that makes a coherent line of unit amplitude peak at unit amplitude after the PSF.
    line_sigma = max(1.2 * height / 512.0, dr)
    ax = np.arange(len(psf_ax)) - len(psf_ax) // 2
    ax_peak = float((psf_ax[:, 0] * np.exp(-0.5 * (ax * dr / line_sigma) ** 2)).sum())
    gain = np.empty((n_r, 1), np.float32)
    for r0, r1, k in psf_lat:
        gain[r0:r1] = 1.0 / (float(k.sum()) * ax_peak)
    for a in (grid_x, grid_y, map1, map2, fan, gain):
        a.setflags(write=False)
    return _UsGeometry(kind, height, width, n_r, n_l, mm_per_px, apex, r_min, dr, theta_max, dl, grid_x, grid_y,
                       map1, map2, fan, psf_ax, psf_lat, alpha_np, line_sigma, gain)


def us_fan_mask(size: tuple[int, int] = (512, 512), geometry: str = "sector") -> np.ndarray:
    """bool (H, W): the pixels a probe of this geometry images (all True for linear)."""
    h, w = _check_size(size)
    return _us_geometry(h, w, geometry).fan.copy()


# ---------------------------------------------------------------- ultrasound scene

@dataclass(frozen=True)
class _Lesion:
    label: str  # "cyst" or "solid"
    cx: float  # centre in tissue coordinates (= pixels at rest)
    cy: float
    a: float  # semi-axes, px
    b: float
    angle: float
    harmonics: np.ndarray  # (k, amplitude, phase) rows: an irregular outline for solid masses
    gain_db: float  # echo amplitude relative to the surrounding tissue
    atten: float  # attenuation relative to tissue (cyst ~0: enhancement; > 3: shadow)

    @property
    def extent(self) -> float:
        return max(self.a, self.b) * (1.0 + float(np.abs(self.harmonics[:, 1]).sum()))

    def rho(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Normalised radius in tissue coordinates: < 1 inside the outline."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = ((x - self.cx) * c + (y - self.cy) * s) / self.a
        v = ((y - self.cy) * c - (x - self.cx) * s) / self.b
        rho = np.sqrt(u * u + v * v)
        if len(self.harmonics):
            # cos(k phi + p) = Re(e^{ip} z^k) with z = e^{i phi}: powers are cheaper than arctan2 + cos.
            z = ((u + 1j * v) / np.maximum(rho, 1e-6)).astype(np.complex64)
            zk, power, scale = np.ones_like(z), 0, np.ones_like(rho)
            for k, amp, ph in self.harmonics:  # ascending k
                while power < k:
                    zk, power = zk * z, power + 1
                scale += np.float32(amp) * (zk * np.complex64(complex(math.cos(ph), math.sin(ph)))).real
            rho = rho / scale
        return rho


@dataclass(frozen=True)
class _UsScene:
    geo: _UsGeometry
    lesions: tuple[_Lesion, ...]
    interfaces: np.ndarray  # (n, k) float32: depth (px) of k interfaces at tissue x = i - margin
    steps_db: np.ndarray  # (k,) echo change below each interface
    lines_db: np.ndarray  # (k,) specular echo of each interface (0: none)
    texture: np.ndarray  # small random grid (dB) upsampled smoothly over the tissue
    margin: float  # px of tissue beyond the image on each side (probe motion room)
    tgc_np: float  # TGC slope, nepers of amplitude per depth sample
    level_db: float  # tissue echo level under the display's top
    range_db: float  # display dynamic range
    noise_power: float  # receiver noise intensity before TGC (tissue echo = 1)


def _us_scene(rng: np.random.Generator, geo: _UsGeometry, n_lesions: tuple[int, int]) -> _UsScene:
    h, w = geo.height, geo.width
    scale = min(h, w) / 512.0
    margin = 16.0 * scale  # lesions stay this far inside the fan so probe motion keeps them visible
    # Layered tissue: wavy near-horizontal interfaces, each a step in echogenicity and some a
    # bright specular line (fascia, organ capsule). Linear probes image skin just under the face.
    k = 3 if geo.kind == "sector" else 4
    y0 = np.sort(rng.uniform(0.05, 0.75, k)) * h
    if geo.kind == "linear":
        y0[0] = rng.uniform(0.02, 0.05) * h
    wave, wavelength, phase = rng.uniform(2, 14, k) * scale, rng.uniform(0.6, 2.0, k) * w, rng.uniform(0, 2 * np.pi, k)
    steps, lines = rng.uniform(-5, 5, k), np.where(rng.random(k) < 0.6, rng.uniform(8, 15, k), 0.0)
    if geo.kind == "linear":
        lines[0] = 12.0  # skin line
    tissue_margin = 0.1 * max(h, w)
    x = np.arange(-tissue_margin, w + tissue_margin + 1)[:, None]
    interfaces = (y0 + wave * np.sin(2 * np.pi * x / wavelength + phase)).astype(np.float32)
    # Smooth texture: a coarse random grid, upsampled once (cubic) so per-frame lookups can be linear.
    texture = cv2.resize(rng.normal(0.0, 2.5, (10, 10)).astype(np.float32), (64, 64), interpolation=cv2.INTER_CUBIC)
    tgc_np, level_db, range_db = geo.alpha_np * rng.uniform(0.9, 1.0), rng.uniform(29.0, 33.0), rng.uniform(50.0, 60.0)
    # Receiver noise: constant before TGC, so after it only the deepest field (and shadows) show it.
    noise_power = math.exp(rng.uniform(-26.0, -18.0) * math.log(10.0) / 10.0 - 2.0 * tgc_np * (geo.n_r - 1))
    # Lesions last, so the same seed with other lesion counts keeps the same background.

    lesions: list[_Lesion] = []
    count = int(rng.integers(n_lesions[0], n_lesions[1] + 1))
    depth_px = geo.dr * (geo.n_r - 1)
    for _ in range(count):
        for attempt in range(40):
            radius = rng.uniform(12.0, 50.0) * scale * (0.97 ** attempt)
            cyst = rng.random() < 0.4
            harm = np.zeros((0, 3))
            if not cyst:
                ks = np.arange(2, 6, dtype=float)
                harm = np.stack([ks, rng.uniform(0, 0.2, 4) / ks, rng.uniform(0, 2 * np.pi, 4)], axis=1)
            lesion_ext = radius * (1.0 + np.abs(harm[:, 1]).sum()) + margin
            top = 0.12 * depth_px + lesion_ext
            if geo.kind == "sector":
                r = geo.r_min + rng.uniform(top, depth_px - lesion_ext)
                if top > depth_px - lesion_ext or lesion_ext >= r:
                    continue
                room = geo.theta_max - math.asin(lesion_ext / r)
                if room <= 0:
                    continue
                th = rng.uniform(-room, room)
                cx, cy = geo.apex[0] + r * math.sin(th), geo.apex[1] + r * math.cos(th)
            else:
                if 2 * lesion_ext >= w or top > h - lesion_ext:
                    continue
                cx, cy = rng.uniform(lesion_ext, w - lesion_ext), rng.uniform(top, h - lesion_ext)
            if any(math.hypot(cx - o.cx, cy - o.cy) < lesion_ext + o.extent + 4 * scale for o in lesions):
                continue
            if cyst:
                gain, atten, aspect = -40.0, 0.05, rng.uniform(0.85, 1.0)
            else:
                hyper = rng.random() < 0.4
                gain = rng.uniform(5.0, 10.0) if hyper else -rng.uniform(6.0, 14.0)
                atten = rng.uniform(4.0, 9.0) if rng.random() < 0.35 else rng.uniform(1.0, 1.6)
                aspect = rng.uniform(0.65, 1.0)
            lesions.append(_Lesion("cyst" if cyst else "solid", cx, cy, radius, radius * aspect,
                                   rng.uniform(0, np.pi), harm, gain, atten))
            break
    return _UsScene(geo, tuple(lesions), interfaces, steps.astype(np.float32), lines.astype(np.float32),
                    texture, tissue_margin, tgc_np, level_db, range_db, noise_power)


def _tissue_coords(geo: _UsGeometry, pose: tuple[float, float, float], x: np.ndarray,
                   y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image pixels -> tissue coordinates for a probe displaced by pose = (dx, dy, rotation)."""
    dx, dy, phi = pose
    if dx == dy == phi == 0.0:
        return x, y
    px, py = (geo.width - 1) / 2.0, 0.0  # pivot: the middle of the probe face
    c, s = math.cos(phi), math.sin(phi)
    xr, yr = x - px, y - py
    return (c * xr - s * yr + px + dx).astype(np.float32), (s * xr + c * yr + py + dy).astype(np.float32)


def _image_coords(geo: _UsGeometry, pose: tuple[float, float, float], tx: np.ndarray | float,
                  ty: np.ndarray | float) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Inverse of _tissue_coords (arrays or scalars)."""
    dx, dy, phi = pose
    px, py = (geo.width - 1) / 2.0, 0.0
    c, s = math.cos(phi), math.sin(phi)
    xr, yr = tx - dx - px, ty - dy - py
    return c * xr + s * yr + px, -s * xr + c * yr + py


def _grid_window(geo: _UsGeometry, x: float, y: float, radius: float) -> tuple[slice, slice]:
    """Beam-grid rows/lines that can see a disc of this radius around pixel (x, y)."""
    if geo.kind == "linear":
        rows = ((y - radius) / geo.dr, (y + radius) / geo.dr)
        cols = ((x - radius) / geo.dl, (x + radius) / geo.dl)
    else:
        dist = math.hypot(x - geo.apex[0], y - geo.apex[1])
        th = math.atan2(x - geo.apex[0], y - geo.apex[1])
        half = math.asin(min(1.0, radius / dist)) if dist > 0 else math.pi
        rows = ((dist - radius - geo.r_min) / geo.dr, (dist + radius - geo.r_min) / geo.dr)
        cols = ((th - half + geo.theta_max) / geo.dl, (th + half + geo.theta_max) / geo.dl)
    r0, r1 = max(0, math.floor(rows[0])), min(geo.n_r, math.ceil(rows[1]) + 1)
    c0, c1 = max(0, math.floor(cols[0])), min(geo.n_l, math.ceil(cols[1]) + 1)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


_ONE = np.ones((1, 1), np.float32)


def _exp(x: np.ndarray) -> np.ndarray:
    """exp with the argument floored (in place) at -40: cv2.exp is ~100x slower where it underflows."""
    return cv2.exp(np.maximum(x, np.float32(-40.0), out=x))


def _psf(field: np.ndarray, geo: _UsGeometry, power: int = 1) -> np.ndarray:
    """Separable PSF in beam coordinates (power=2: the squared PSF, for mean intensity)."""
    out = np.empty_like(field)
    for r0, r1, k in geo.psf_lat:
        out[r0:r1] = cv2.sepFilter2D(field[r0:r1], -1, k ** power, _ONE)
    return cv2.sepFilter2D(out, -1, _ONE, geo.psf_ax ** power)


def _speckle(amp: np.ndarray, scatterers: np.ndarray, geo: _UsGeometry, noise_power: float,
             coherent: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """ln intensity of the PSF-filtered complex echo plus receiver noise, and ln of its expectation."""
    echo = _psf(scatterers * amp[..., None], geo)
    mean = _psf(cv2.multiply(amp, amp), geo, power=2) + np.float32(noise_power)
    if coherent is not None:
        steady = _psf(coherent, geo)
        echo[..., 0] += steady
        mean += cv2.multiply(steady, steady)
    # Receiver noise: the scatterers half the depth away stand in for fresh white complex noise
    # (independent of the echo where it is added, and saves drawing as many normals again).
    echo += np.float32(math.sqrt(noise_power)) * np.roll(scatterers, geo.n_r // 2, axis=0)
    re, im = echo[..., 0], echo[..., 1]
    intensity = cv2.add(cv2.multiply(re, re), cv2.multiply(im, im))
    return cv2.log(intensity + np.float32(1e-12)), cv2.log(mean + np.float32(1e-12))


def _us_render(scene: _UsScene, pose: tuple[float, float, float],
               scatterers: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[str]]:
    geo = scene.geo
    xq, yq = _tissue_coords(geo, pose, geo.grid_x, geo.grid_y)
    # Echogenicity (amplitude dB): smooth texture + layered interfaces.
    span_x, span_y = geo.width + 2 * scene.margin, geo.height + 2 * scene.margin
    gh, gw = scene.texture.shape
    mx = ((xq + scene.margin) * ((gw - 1) / span_x)).astype(np.float32)
    my = ((yq + scene.margin) * ((gh - 1) / span_y)).astype(np.float32)
    refl_db: np.ndarray = cv2.remap(scene.texture, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # Interfaces looked up by tissue x (1 px steps; they are smooth): d = depth below each.
    col = np.clip((xq + np.float32(scene.margin + 0.5)).astype(np.int32), 0, len(scene.interfaces) - 1)
    d = yq[..., None] - np.take(scene.interfaces, col, axis=0)
    refl_db += np.clip(d * np.float32(0.25) + np.float32(0.5), 0, 1) @ scene.steps_db
    # Specular interfaces: mostly a coherent reflection (a steady bright line: a real-valued echo
    # added to the scatterers' field), partly brighter diffuse scattering (speckled).
    specular = None
    has = scene.lines_db > 0
    if has.any():
        dl = d[..., has]
        profile = _exp(dl * dl * np.float32(-0.5 / geo.line_sigma ** 2)).reshape(dl.shape)
        refl_db += profile @ (np.float32(0.5) * scene.lines_db[has])
        specular = profile @ (10.0 ** (scene.lines_db[has] / 20.0)).astype(np.float32)
    alpha = np.full((geo.n_r, geo.n_l), geo.alpha_np, np.float32)
    # Lesions: a soft edge (~1.5 px) in both echo and attenuation, computed only where they can be.
    centers = [tuple(map(float, _image_coords(geo, pose, les.cx, les.cy))) for les in scene.lesions]
    for les, (cx, cy) in zip(scene.lesions, centers):
        rows, cols = _grid_window(geo, cx, cy, les.extent + 3.0)
        rho = les.rho(xq[rows, cols], yq[rows, cols])
        wgt = np.clip((1.0 - rho) * (les.a / 1.5) + 0.5, 0.0, 1.0).astype(np.float32)
        refl_db[rows, cols] += np.float32(les.gain_db) * wgt
        alpha[rows, cols] += np.float32(geo.alpha_np * (les.atten - 1.0)) * wgt
    # Round-trip attenuation accumulates along each beam: what lies above shadows or enhances.
    reach = _exp(-np.cumsum(alpha, axis=0, dtype=np.float32))
    amp = _exp(refl_db * np.float32(_NP_PER_DB)) * reach
    coherent = None if specular is None else specular * reach * geo.coherent_gain
    log_i, log_mean = _speckle(amp, scatterers, geo, scene.noise_power, coherent)
    # TGC + log compression: level_db of tissue at 0 dB sits below the top of a range_db window.
    per_ln = np.float32(255.0 / scene.range_db * 10.0 / math.log(10.0))  # grey levels per ln(intensity)
    tgc = 2.0 * scene.tgc_np * np.arange(geo.n_r, dtype=np.float32)[:, None]
    offset = (255.0 * (scene.range_db - scene.level_db) / scene.range_db + 0.5 + per_ln * tgc).astype(np.float32)
    img = log_i * per_ln + offset
    ref = (log_mean - np.float32(_EULER_GAMMA)) * per_ln + offset  # mean of log speckle, not log of mean
    beams = np.clip(np.dstack([img, ref]), 0, 255).astype(np.uint8)
    both = cv2.remap(beams, geo.map1, geo.map2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    pixels, clean = np.ascontiguousarray(both[..., 0]), np.ascontiguousarray(both[..., 1])
    # Ground truth from the same outlines, on the pixel grid, clipped to the fan.
    masks, labels = [], []
    for les, (cx, cy) in zip(scene.lesions, centers):
        ext = les.extent + 2.0
        x0, y0 = math.floor(cx - ext), math.floor(cy - ext)
        xs = np.arange(x0, math.ceil(cx + ext) + 1, dtype=np.float32)[None, :]
        ys = np.arange(y0, math.ceil(cy + ext) + 1, dtype=np.float32)[:, None]
        tx, ty = _tissue_coords(geo, pose, np.broadcast_to(xs, (ys.size, xs.size)),
                                np.broadcast_to(ys, (ys.size, xs.size)))
        inside = les.rho(tx, ty) < 1.0
        full = int(inside.sum())
        mask = np.zeros((geo.height, geo.width), bool)
        iy0, ix0 = max(0, y0), max(0, x0)
        iy1, ix1 = min(geo.height, y0 + ys.size), min(geo.width, x0 + xs.size)
        if iy1 > iy0 and ix1 > ix0:
            mask[iy0:iy1, ix0:ix1] = inside[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
        mask &= geo.fan
        visible = int(mask.sum())
        if full and visible >= 9 and visible >= 0.3 * full:  # mostly out of view: not a target
            masks.append(mask)
            labels.append(les.label)
    return pixels, clean, masks, labels


def _us_frame(scene: _UsScene, pose: tuple[float, float, float], scatterers: np.ndarray, seq: int,
              stream_id: str) -> Frame:
    pixels, clean, masks, labels = _us_render(scene, pose, scatterers)
    geo = scene.geo
    return Frame(pixels=pixels, modality=US_MODALITY, bits_stored=8, photometric="MONOCHROME2",
                 pixel_spacing=(geo.mm_per_px, geo.mm_per_px), stream_id=stream_id, seq=seq,
                 source="phantom:us", truth=_truth(masks, labels, clean, pixels.shape))


def _scatterers(rng: np.random.Generator, geo: _UsGeometry) -> np.ndarray:
    """Circular complex Gaussian scatterers, E|s|^2 = 1: many sub-resolution scatterers per sample."""
    return rng.standard_normal((geo.n_r, geo.n_l, 2), dtype=np.float32) * np.float32(math.sqrt(0.5))


def us_frame(seed: int | np.random.Generator, *, size: tuple[int, int] = (512, 512), geometry: str = "sector",
             n_lesions: tuple[int, int] = (1, 3), seq: int = 0, stream_id: str = "us-phantom") -> Frame:
    """One B-mode frame (uint8, MONOCHROME2) with lesion boxes, masks and the speckle-free image."""
    h, w = _check_size(size)
    geo = _us_geometry(h, w, geometry)
    anatomy, _motion, noise = _streams(seed, 3)
    scene = _us_scene(anatomy, geo, _check_range(n_lesions, "n_lesions"))
    return _us_frame(scene, (0.0, 0.0, 0.0), _scatterers(noise, geo), seq, stream_id)


def _probe_path(rng: np.random.Generator, geo: _UsGeometry) -> np.ndarray:
    """Smooth probe motion: per axis, a sum of slow sinusoids; (amplitude px|rad, Hz, phase) rows."""
    amps = [0.03 * geo.width, 0.015 * geo.height, math.radians(2.5)]
    rows = [[a * rng.uniform(0.4, 1.0) / 2.0, rng.uniform(0.1, 0.45), rng.uniform(0, 2 * np.pi)]
            for a in amps for _ in range(2)]
    return np.array(rows).reshape(3, 2, 3)


def _pose(path: np.ndarray, t: float) -> tuple[float, float, float]:
    """Pose at time t, relative to t = 0 (so frame 0 of a cine equals us_frame of the same seed)."""
    amp, freq, phase = path[..., 0], path[..., 1], path[..., 2]
    v = (amp * (np.sin(2 * np.pi * freq * t + phase) - np.sin(phase))).sum(axis=1)
    return float(v[0]), float(v[1]), float(v[2])


def us_cine(seed: int, n_frames: int, *, size: tuple[int, int] = (512, 512), geometry: str = "sector",
            fps: float = 30.0, stream_id: str = "us-phantom") -> Iterator[Frame]:
    """A B-mode cine: fixed anatomy seen through a smoothly moving probe.

    Scatterers move with the tissue (the previous frame's field is warped by the probe motion) and
    are partly renewed each frame, faster when the probe moves faster: in-plane motion shifts the
    speckle, out-of-plane motion decorrelates it.
    """
    h, w = _check_size(size)
    n = _check_frames(n_frames)
    if not (isinstance(fps, (int, float)) and 0 < fps <= 1000):
        raise InputError(expected("fps in (0, 1000]", fps))
    geo = _us_geometry(h, w, geometry)
    anatomy, motion, noise = _streams(seed, 3)
    scene = _us_scene(anatomy, geo, (1, 3))
    path = _probe_path(motion, geo)
    scat = _scatterers(noise, geo)
    prev = (0.0, 0.0, 0.0)
    for i in range(n):
        pose = _pose(path, i / fps)
        if i:
            # Where each beam sample's tissue was in the previous frame's beam grid.
            tx, ty = _tissue_coords(geo, pose, geo.grid_x, geo.grid_y)
            px, py = _image_coords(geo, prev, tx, ty)
            row, col = geo.to_grid(np.asarray(px), np.asarray(py))
            warped = cv2.remap(scat, col.astype(np.float32), row.astype(np.float32), cv2.INTER_NEAREST,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            shift = math.hypot(pose[0] - prev[0], pose[1] - prev[1]) + abs(pose[2] - prev[2]) * geo.height / 2
            keep = math.exp(-0.03 - 0.06 * shift)
            fresh = _scatterers(noise, geo)
            inside = ((row >= 0) & (row <= geo.n_r - 1) & (col >= 0) & (col <= geo.n_l - 1))[..., None]
            # New tissue entering the view gets fully fresh scatterers; keep variance at 1.
            scat = np.where(inside, np.float32(keep) * warped + np.float32(math.sqrt(1 - keep * keep)) * fresh,
                            fresh)
        yield _us_frame(scene, pose, scat, i, stream_id)
        prev = pose


def us_envelope(seed: int | np.random.Generator, *, size: tuple[int, int] = (256, 256)) -> np.ndarray:
    """float32 envelope (before log compression) of homogeneous tissue: no lesions, no attenuation.

    Rows are depth samples and columns scan lines, formed exactly as in the frames (complex
    scatterers through the linear probe's PSF), so its statistics are the frames' speckle statistics.
    """
    h, w = _check_size(size)
    geo = _us_geometry(2 * h, 2 * w, "linear")  # its beam grid is h x w
    scat = _scatterers(_streams(seed, 3)[2], geo)
    echo = _psf(scat, geo)
    return cv2.magnitude(echo[..., 0], echo[..., 1])


# ---------------------------------------------------------------- X-ray

@dataclass(frozen=True)
class _Nodule:
    cx: float
    cy: float
    r: float
    contrast: float  # peak added mu at the centre


def _segment_distance(u: np.ndarray, v: np.ndarray, p: tuple[float, float], q: tuple[float, float]) -> np.ndarray:
    px, py = p
    dx, dy = q[0] - px, q[1] - py
    t = np.clip(((u - px) * dx + (v - py) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(u - px - t * dx, v - py - t * dy)


def _dome(d2: np.ndarray) -> np.ndarray:
    """Projected thickness of an ellipsoid from its squared normalised radius (d2 >= 0)."""
    t = 1.0 - d2
    return np.sqrt(np.maximum(t, 0.0, out=t))


def _chest_mu(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Line integrals mu (float32 H x W) of a PA chest, and a lung 'depth' map (0 outside lungs
    and behind the heart)."""
    hh, hw = max(32, h // 2), max(32, w // 2)  # anatomy is smooth: build at half resolution
    v = ((np.arange(hh, dtype=np.float32) + 0.5) / hh)[:, None]
    u = ((np.arange(hw, dtype=np.float32) + 0.5) / hw)[None, :]

    def j(lo: float, hi: float) -> float:  # anatomical jitter
        return float(rng.uniform(lo, hi))

    cx = 0.5 + j(-0.02, 0.02)
    ax = abs(u - cx)
    # Body: thorax (shoulders at the top edge), neck, upper arms at the sides.
    body = 3.2 * j(0.9, 1.1) * _dome(((u - cx) / j(0.40, 0.45)) ** 2 + ((v - 0.6) / 0.66) ** 2) ** 0.6
    neck = 3.0 * _dome(((u - cx) / 0.11) ** 2 + (v / 0.22) ** 2) ** 0.5
    arms = 2.2 * _dome(((ax - 0.46) / 0.06) ** 2 + ((v - 0.2) / 0.5) ** 2)
    mu: np.ndarray = np.maximum(body, neck) + arms
    # Lungs: air removes attenuation; narrower at the apex, domed hemidiaphragms at the base.
    lungs = np.zeros_like(mu)
    dia = j(0.72, 0.78)
    for side in (-1.0, 1.0):
        lx = cx + side * j(0.18, 0.20)
        lw = j(0.15, 0.17) * (0.5 + 0.5 * np.clip((v - 0.08) / 0.3, 0, 1))
        base = dia + (0.025 if side > 0 else 0.0) - 0.08 * np.clip(1.0 - ((u - lx) / 0.17) ** 2, 0, 1)
        shape = _dome(((u - lx) / lw) ** 2 + ((v - 0.5) / 0.44) ** 2) * np.clip((base - v) / 0.03, 0, 1)
        lungs = np.maximum(lungs, shape)
    mu -= 1.7 * j(0.9, 1.1) * lungs ** 0.6
    # Heart (to the patient's left = image right) resting on the diaphragm, mediastinum with the
    # trachea's air column, hila, spine with vertebrae.
    hx, hy = cx + j(0.04, 0.07), dia - 0.1
    heart = _dome(((u - hx) / j(0.15, 0.18)) ** 2 + ((v - hy) / j(0.12, 0.14)) ** 2) * np.clip((dia + 0.06 - v) / 0.05, 0, 1)
    mu += 1.2 * heart ** 0.5
    mu += 0.7 * _dome(((u - cx) / 0.07) ** 2 + ((v - 0.3) / 0.35) ** 2) ** 0.5
    mu -= 0.35 * _dome(((u - cx) / 0.018) ** 2) * np.clip((0.38 - v) / 0.05, 0, 1)
    mu += 0.3 * sum(_dome(((u - cx - s * 0.1) / 0.045) ** 2 + ((v - 0.45) / 0.07) ** 2) for s in (-1, 1))
    spine = _dome(((u - cx) / 0.03) ** 2) * (0.8 + 0.2 * np.cos(2 * np.pi * v / 0.046))
    mu += 0.45 * spine * np.clip(v / 0.05, 0, 1)
    # Posterior ribs: one family of arcs (level at the spine, curving down along the chest wall);
    # rib index = floor of a curved coordinate, a tube profile (dense cortex) across each rib.
    # Anterior ribs: fainter, sloping down towards the midline.
    l = np.clip(ax - 0.03, 0, None)
    spacing = j(0.064, 0.072)
    s = (v - 0.08 - j(-0.01, 0.01) + 0.08 * l - 1.3 * l * l) / spacing
    frac = np.abs(s - np.floor(s) - 0.5) * spacing / 0.014
    cage = _dome(((u - cx) / 0.43) ** 2 + ((v - 0.47) / 0.45) ** 2) > 0
    ribs = (_dome(frac ** 2) - 0.5 * _dome((frac / 0.7) ** 2)) * ((s >= 0) & (s < 10) & cage)
    sa = (v - 0.17 - 0.45 * np.clip(0.42 - l, 0, None)) / (1.3 * spacing)
    fa = np.abs(sa - np.floor(sa) - 0.5) * 1.3 * spacing / 0.012
    ribs_a = _dome(fa ** 2) * ((sa >= 0) & (sa < 5) & cage & (l > 0.1))
    mu += 0.4 * ribs + 0.15 * ribs_a
    for side in (-1.0, 1.0):  # clavicles
        d = _segment_distance(u, v, (cx + side * 0.04, 0.17), (cx + side * 0.30, 0.11 + j(-0.01, 0.01)))
        mu += 0.55 * _dome((d / 0.014) ** 2)
    # Lung markings: band-limited texture, stronger towards the hila.
    small = rng.normal(0.0, 1.0, (24, 24)).astype(np.float32)
    marks = cv2.resize(small, (hw, hh), interpolation=cv2.INTER_CUBIC)
    mu += 0.06 * marks * lungs * (1.5 - np.clip(ax / 0.3, 0, 1))
    mu = cv2.GaussianBlur(np.clip(mu, 0, None).astype(np.float32), (0, 0), 0.7)
    mu = cv2.resize(mu, (w, h), interpolation=cv2.INTER_CUBIC)
    # Where a nodule would be seen against lung: lung, not behind the heart.
    free = cv2.resize((lungs * (heart <= 0)).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(mu, 0, None), free


def _nodules(rng: np.random.Generator, lungs: np.ndarray, n_range: tuple[int, int]) -> list[_Nodule]:
    h, w = lungs.shape
    scale = min(h, w) / 512.0
    ys, xs = np.nonzero(lungs > 0.35)  # well inside a lung
    out: list[_Nodule] = []
    if not len(xs):
        return out
    for _ in range(int(rng.integers(n_range[0], n_range[1] + 1))):
        for _attempt in range(40):
            r = max(2.0, rng.uniform(4.0, 20.0) * scale)
            k = int(rng.integers(len(xs)))
            cx, cy = float(xs[k]) + rng.uniform(-0.5, 0.5), float(ys[k]) + rng.uniform(-0.5, 0.5)
            if not (r <= cx <= w - 1 - r and r <= cy <= h - 1 - r):
                continue
            if any(math.hypot(cx - o.cx, cy - o.cy) < r + o.r + 3 for o in out):
                continue
            out.append(_Nodule(cx, cy, r, rng.uniform(0.12, 0.45)))
            break
    return out


def _nodule_window(n: _Nodule, h: int, w: int,
                   affine: np.ndarray | None = None) -> tuple[slice, slice, np.ndarray]:
    """Pixel window around a (moved) nodule: its slices and the squared normalised radius there."""
    cx, cy, r = n.cx, n.cy, n.r
    if affine is not None:
        cx, cy = affine @ np.array([cx, cy, 1.0])
        r *= math.sqrt(abs(np.linalg.det(affine[:, :2])))
    x0, x1 = max(0, math.floor(cx - r - 1)), min(w, math.ceil(cx + r + 2))
    y0, y1 = max(0, math.floor(cy - r - 1)), min(h, math.ceil(cy + r + 2))
    xs = np.arange(x0, x1, dtype=np.float32)[None, :]
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]
    return slice(y0, y1), slice(x0, x1), ((xs - cx) ** 2 + (ys - cy) ** 2) / np.float32(r * r)


def _xr_expose(mu: np.ndarray, dose: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noisy and clean 12-bit images of mu at a relative dose."""
    top = (1 << XR_BITS) - 1
    clean = np.clip(mu * np.float32(XR_GAIN) + np.float32(XR_OFFSET + 0.5), 0, top).astype(np.uint16)
    lam = np.float32(XR_PHOTONS * dose) * cv2.exp(-mu)
    # Poisson quanta (+ electronic noise); normal approximation where counts are high.
    z = rng.standard_normal(mu.shape, np.float32)
    counts = lam + cv2.sqrt(lam + np.float32(XR_ELECTRONIC_NOISE ** 2)) * z
    low = lam < _POISSON_EXACT_BELOW
    if low.any():
        counts[low] = rng.poisson(lam[low]) + np.float32(XR_ELECTRONIC_NOISE) * z[low]
    est = -cv2.log(np.maximum(counts, np.float32(0.5)) / np.float32(XR_PHOTONS * dose))
    noisy = np.clip(est * np.float32(XR_GAIN) + np.float32(XR_OFFSET + 0.5), 0, top).astype(np.uint16)
    return noisy, clean


def xr_noise_variance(clean: np.ndarray, dose: float) -> np.ndarray:
    """Predicted per-pixel variance (stored units^2) of frame - clean at a dose, from the detector model."""
    mu = (clean.astype(np.float64) - XR_OFFSET) / XR_GAIN
    lam = XR_PHOTONS * dose * np.exp(-mu)
    return XR_GAIN ** 2 * (lam + XR_ELECTRONIC_NOISE ** 2) / lam ** 2


def _check_dose(dose: float) -> float:
    if not isinstance(dose, (int, float)) or isinstance(dose, bool) or not 1e-3 <= dose <= 1e3:
        raise InputError(expected("dose (relative) in 0.001..1000", dose))
    return float(dose)


def _xr_scene(rng: np.random.Generator, h: int, w: int, n_range: tuple[int, int]) -> tuple[np.ndarray, list[_Nodule]]:
    mu, lungs = _chest_mu(rng, h, w)
    nodules = _nodules(rng, lungs, n_range)
    for n in nodules:  # soft blobs: a projected sphere (sqrt(r^2 - d^2)) with a softened rim
        rows, cols, d2 = _nodule_window(n, h, w)
        mu[rows, cols] += np.float32(n.contrast) * _dome(d2) ** 1.5  # soft edge
    return mu, nodules


def _xr_frame(mu: np.ndarray, nodules: list[_Nodule], affine: np.ndarray | None, dose: float,
              noise: np.random.Generator, seq: int, stream_id: str) -> Frame:
    h, w = mu.shape
    noisy, clean = _xr_expose(mu, dose, noise)
    masks = []
    for n in nodules:
        rows, cols, d2 = _nodule_window(n, h, w, affine)
        m = np.zeros((h, w), bool)
        m[rows, cols] = d2 < 1.0
        if m.any():
            masks.append(m)
    spacing = 430.0 / max(h, w)
    return Frame(pixels=noisy, modality=XR_MODALITY, bits_stored=XR_BITS, photometric="MONOCHROME2",
                 pixel_spacing=(spacing, spacing), stream_id=stream_id, seq=seq, source="phantom:xr",
                 truth=_truth(masks, ["nodule"] * len(masks), clean, (h, w)))


def xr_frame(seed: int | np.random.Generator, *, size: tuple[int, int] = (512, 512), dose: float = 1.0,
             n_nodules: tuple[int, int] = (0, 3), seq: int = 0, stream_id: str = "xr-phantom") -> Frame:
    """A chest radiograph (uint16, 12 bits, bright = attenuating) with nodule truth and clean image."""
    h, w = _check_size(size)
    dose = _check_dose(dose)
    anatomy, _motion, noise = _streams(seed, 3)
    mu, nodules = _xr_scene(anatomy, h, w, _check_range(n_nodules, "n_nodules"))
    return _xr_frame(mu, nodules, None, dose, noise, seq, stream_id)


def xr_sequence(seed: int, n_frames: int, *, size: tuple[int, int] = (512, 512), dose: float = 1.0,
                stream_id: str = "xr-phantom") -> Iterator[Frame]:
    """Fluoroscopy-like frames: the same chest breathing and drifting slightly, fresh noise each frame."""
    h, w = _check_size(size)
    dose = _check_dose(dose)
    n = _check_frames(n_frames)
    anatomy, motion, noise = _streams(seed, 3)
    mu, nodules = _xr_scene(anatomy, h, w, (0, 3))
    breath_hz, phase = motion.uniform(0.2, 0.33), motion.uniform(0, 2 * np.pi)
    sway = motion.uniform(0.3, 1.0, 2) * 0.01 * min(h, w)  # px
    sway_hz, sway_phase = motion.uniform(0.05, 0.15, 2), motion.uniform(0, 2 * np.pi, 2)
    for i in range(n):
        t = i / XR_FPS
        # Breathing stretches the chest vertically about the shoulders; the patient sways a little.
        stretch = 1.0 + 0.012 * (math.sin(2 * np.pi * breath_hz * t + phase) - math.sin(phase))
        sx, sy = sway * (np.sin(2 * np.pi * sway_hz * t + sway_phase) - np.sin(sway_phase))
        affine = np.array([[1.0, 0.0, sx], [0.0, stretch, 0.1 * h * (1 - stretch) + sy]])
        moved = mu if i == 0 else cv2.warpAffine(mu, affine, (w, h), flags=cv2.INTER_LINEAR,
                                                 borderMode=cv2.BORDER_REPLICATE)
        yield _xr_frame(moved, nodules, None if i == 0 else affine, dose, noise, i, stream_id)
