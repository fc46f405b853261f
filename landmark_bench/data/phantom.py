"""Procedural X-ray-like hand phantom: a landmark dataset with exact answers and no download.

A stylised hand radiograph (forearm, carpals, metacarpals, phalanges) is built from a template
skeleton of control points. Each image varies it (finger spread, flexion and length, a smooth
low-frequency deformation field, rotation, scale, translation) and renders it as an X-ray
projection: every bone is a tube or ellipsoid whose cortex is denser than its marrow, so its rim is
brighter, over a smooth soft-tissue silhouette and a background gradient, then blurred and given
signal-dependent (Poisson-like) noise. The landmarks are control points of the posed skeleton
(bone tips, joint centres, bone ends) and the bones are drawn from those same points, so every
landmark sits exactly on its feature.

Points are xy in pixels of the original grid, pixel-centre convention (centre of the top-left pixel
at (0, 0), as in :mod:`landmark_bench.geometry`). Everything random comes from
``numpy.random.default_rng(SeedSequence((seed, index)))``, so a (seed, index) pair gives
bit-identical arrays in any process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PHANTOM_IMAGE_SIZE: tuple[int, int] = (320, 256)
# Life-size anatomy: the wrist-to-middle-fingertip distance (~210 px) is ~170 mm.
PHANTOM_SPACING_MM: float = 0.8
LANDMARK_NAMES: list[str] = [
    "thumb_tip",
    "index_tip",
    "middle_tip",
    "ring_tip",
    "little_tip",
    "thumb_mcp",
    "index_mcp",
    "middle_mcp",
    "ring_mcp",
    "little_mcp",
    "radius_distal_end",
    "ulna_distal_end",
]

_MARGIN_PX = 8.0  # every landmark stays at least this far inside the image
_HALF_JOINT_GAP_PX = 2.5  # joint space between neighbouring bones, halved


@dataclass(frozen=True)
class _FingerTemplate:
    """A finger ray in template pixels (origin at the image centre, y down)."""

    mcp: tuple[float, float]  # metacarpophalangeal joint centre
    angle_deg: float  # direction from the wrist, 0 = straight up, positive towards the little finger
    metacarpal_length: float
    phalanx_lengths: tuple[float, ...]  # proximal to distal
    bone_radius: float
    abduction_deg: float  # phalanx swing about the MCP joint at full abduction (fingers fan together)
    jitter_deg: float  # independent swing about the MCP joint on top of the shared abduction


_FINGERS: tuple[_FingerTemplate, ...] = (  # thumb, index, middle, ring, little: LANDMARK_NAMES order
    _FingerTemplate((-38.0, 10.0), -48.0, 44.0, (30.0, 22.0), 7.0, 0.0, 10.0),
    _FingerTemplate((-12.0, -32.0), -8.0, 68.0, (36.0, 22.0, 16.0), 6.6, -5.0, 2.5),
    _FingerTemplate((10.0, -38.0), -1.0, 70.0, (40.0, 25.0, 17.0), 6.8, 0.0, 2.5),
    _FingerTemplate((31.0, -33.0), 6.0, 64.0, (37.0, 23.0, 16.0), 6.3, 5.0, 2.5),
    _FingerTemplate((50.0, -22.0), 14.0, 58.0, (29.0, 18.0, 14.0), 5.7, 10.0, 2.5),
)
# Bone radius (base, shaft, head) as multiples of the finger's bone radius: ends flare like epiphyses.
_METACARPAL_PROFILE = (1.05, 0.72, 1.15)
_PHALANX_PROFILES = {"proximal": (1.0, 0.68, 0.88), "middle": (0.85, 0.58, 0.75), "distal": (0.75, 0.5, 0.45)}

# Forearm bones: (proximal end far below the image, distal end), shaft radius, distal flare radius.
_RADIUS_TEMPLATE = (np.array([[-6.0, 270.0], [-2.0, 88.0]]), 8.0, 12.0)
_ULNA_TEMPLATE = (np.array([[38.0, 270.0], [34.0, 92.0]]), 6.5, 8.0)
# Carpal bones as ellipsoids: centre x, centre y, semi-axis a, semi-axis b, angle (degrees).
_CARPALS = np.array(
    [
        [-10.0, 46.0, 8.0, 6.5, 30.0],
        [5.0, 44.0, 7.0, 6.0, 0.0],
        [20.0, 45.0, 8.5, 7.0, 0.0],
        [36.0, 49.0, 8.0, 6.5, -20.0],
        [-6.0, 64.0, 9.0, 6.0, -25.0],
        [12.0, 63.0, 7.5, 6.5, 0.0],
        [28.0, 65.0, 7.0, 6.0, 15.0],
        [40.0, 63.0, 4.5, 4.5, 0.0],
    ]
)


@dataclass(frozen=True)
class _Hand:
    """One posed hand in image pixels."""

    finger_chains: list[np.ndarray]  # per finger (bones + 1, 2): metacarpal base, MCP, ..., tip
    finger_radii: np.ndarray  # (5,)
    forearm_ends: np.ndarray  # (2, 2, 2): radius and ulna, (proximal, distal) xy
    forearm_radii: np.ndarray  # (2, 2): radius and ulna, (shaft, distal flare)
    carpals: np.ndarray  # (8, 5) as _CARPALS, posed

    def shifted(self, offset: np.ndarray) -> _Hand:
        """The same hand translated by ``offset`` (xy pixels)."""
        carpals = self.carpals.copy()
        carpals[:, :2] += offset
        return _Hand(
            finger_chains=[chain + offset for chain in self.finger_chains],
            finger_radii=self.finger_radii,
            forearm_ends=self.forearm_ends + offset,
            forearm_radii=self.forearm_radii,
            carpals=carpals,
        )

    @property
    def landmarks(self) -> np.ndarray:
        """(L, 2) in LANDMARK_NAMES order: tips, MCP joint centres, distal forearm bone ends."""
        tips = [chain[-1] for chain in self.finger_chains]
        joints = [chain[1] for chain in self.finger_chains]
        return np.array([*tips, *joints, self.forearm_ends[0, 1], self.forearm_ends[1, 1]], dtype=np.float64)


def make_phantom(seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """image uint8 (H, W) and landmarks float64 (L, 2) xy in pixels (pixel-centre convention)."""
    if seed < 0 or index < 0:
        raise ValueError(f"phantom seed and index must be non-negative, got seed={seed}, index={index}")
    rng = np.random.default_rng(np.random.SeedSequence((seed, index)))
    hand = _sample_hand(rng)
    return _render(hand, rng), hand.landmarks


def _direction(angle_deg: float) -> np.ndarray:
    """Unit vector at ``angle_deg`` from straight up (y down), positive towards +x."""
    angle = np.deg2rad(angle_deg)
    return np.array([np.sin(angle), -np.cos(angle)])


def _finger_chain(finger: _FingerTemplate, abduction: float, rng: np.random.Generator) -> np.ndarray:
    """Joint points of one finger with this image's abduction, flexion and bone lengths.

    The fingers fan out or close together (one shared ``abduction``) with only a small independent
    swing, so neighbouring fingers may touch but never cross.
    """
    base = np.asarray(finger.mcp) - finger.metacarpal_length * _direction(finger.angle_deg)
    metacarpal_angle = finger.angle_deg + rng.uniform(-2.0, 2.0)
    length_scale = rng.uniform(0.92, 1.08)
    points = [base, base + finger.metacarpal_length * length_scale * _direction(metacarpal_angle)]
    angle = metacarpal_angle + abduction * finger.abduction_deg + rng.uniform(-finger.jitter_deg, finger.jitter_deg)
    for length in finger.phalanx_lengths:
        points.append(points[-1] + length * length_scale * _direction(angle))
        angle += rng.uniform(-3.0, 3.0)
    return np.array(points)


def _smooth_field(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Displacements of a random low-frequency field (a few wide Gaussian bumps) at ``points``.

    Wide bumps move neighbouring control points almost together, so the shape changes but bones
    never cross or swap order.
    """
    centres = rng.uniform([-90.0, -130.0], [90.0, 110.0], size=(4, 2))
    amplitudes = rng.normal(0.0, 4.0, size=(4, 2))
    squared = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
    weights = np.exp(-squared / (2 * 60.0**2))
    return weights @ amplitudes


def _sample_hand(rng: np.random.Generator) -> _Hand:
    """Template skeleton -> per-finger variation -> smooth deformation -> similarity pose."""
    abduction = rng.uniform(-0.5, 1.0)
    chains = [_finger_chain(finger, abduction, rng) for finger in _FINGERS]
    forearm = np.concatenate([_RADIUS_TEMPLATE[0], _ULNA_TEMPLATE[0]])
    carpals = _CARPALS.copy()
    points = np.concatenate([*chains, forearm, carpals[:, :2]])
    points = points + _smooth_field(points, rng)

    scale = rng.uniform(0.9, 1.1)
    angle_deg = rng.uniform(-15.0, 15.0)
    cos, sin = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    rotation = np.array([[cos, -sin], [sin, cos]])
    points = scale * points @ rotation.T

    splits = np.cumsum([*(len(chain) for chain in chains), len(forearm)])
    *chains, forearm_points, carpal_centres = np.split(points, splits)
    thickness = scale * rng.uniform(0.92, 1.08)
    carpals[:, :2] = carpal_centres
    carpals[:, 2:4] *= thickness
    carpals[:, 4] += angle_deg
    centred = _Hand(
        finger_chains=chains,
        finger_radii=thickness * np.array([finger.bone_radius for finger in _FINGERS]),
        forearm_ends=forearm_points.reshape(2, 2, 2),
        forearm_radii=thickness * np.array([_RADIUS_TEMPLATE[1:], _ULNA_TEMPLATE[1:]]),
        carpals=carpals,
    )
    return centred.shifted(_translation(centred.landmarks, rng))


def _translation(landmarks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniform shift from the centred template among those keeping every landmark in the margin."""
    height, width = PHANTOM_IMAGE_SIZE
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    low = _MARGIN_PX - (centre + landmarks.min(0))
    high = np.array([width - 1, height - 1]) - _MARGIN_PX - (centre + landmarks.max(0))
    assert np.all(low <= high), "posed template wider than the image: shrink the pose ranges"
    return centre + rng.uniform(low, high)


def _window(low: np.ndarray, high: np.ndarray) -> tuple[slice, slice] | None:
    """Image rows and columns covering the xy box [low, high], or None when it misses the image."""
    height, width = PHANTOM_IMAGE_SIZE
    x0, y0 = max(int(np.floor(low[0])), 0), max(int(np.floor(low[1])), 0)
    x1, y1 = min(int(np.ceil(high[0])) + 1, width), min(int(np.ceil(high[1])) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _segment_coordinates(
    start: np.ndarray, end: np.ndarray, reach: float
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """Window around a segment, and per pixel: position t in [0, 1] along it and distance to it."""
    window = _window(np.minimum(start, end) - reach, np.maximum(start, end) + reach)
    if window is None:
        return None
    rows, cols = window
    y = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] - np.float32(start[1])
    x = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] - np.float32(start[0])
    axis = (end - start).astype(np.float32)
    length_squared = max(float(axis @ axis), 1e-6)
    t = np.clip((x * axis[0] + y * axis[1]) / length_squared, 0.0, 1.0)
    distance = np.hypot(x - t * axis[0], y - t * axis[1])
    return window, t, distance


def _shell_attenuation(rho: np.ndarray, radius: np.ndarray | float) -> np.ndarray:
    """Line integral through a bone of given radius at normalised distance ``rho`` from its axis.

    A dense cortex (outer 38% of the radius) around lighter marrow: the path through the cortex is
    longest near the edge, which is why bones in radiographs have bright rims.
    """
    marrow_fraction, mu_cortex, mu_marrow = 0.62, 0.2, 0.012
    outer = 2 * radius * np.sqrt(np.clip(1 - rho**2, 0, None))
    inner = 2 * radius * np.sqrt(np.clip(marrow_fraction**2 - rho**2, 0, None))
    return mu_cortex * (outer - inner) + mu_marrow * inner


def _add_bone(
    bone: np.ndarray, start: np.ndarray, end: np.ndarray, base_radius: float, shaft_radius: float, head_radius: float
) -> None:
    """Add a long bone whose radius flares from the shaft to its two ends (rounded caps)."""
    found = _segment_coordinates(start, end, max(base_radius, head_radius))
    if found is None:
        return
    window, t, distance = found
    radius = shaft_radius + (base_radius - shaft_radius) * (1 - t) ** 4 + (head_radius - shaft_radius) * t**4
    bone[window] += _shell_attenuation(distance / radius, radius)


def _add_carpal(bone: np.ndarray, centre_x: float, centre_y: float, a: float, b: float, angle_deg: float) -> None:
    """Add an ellipsoidal carpal bone."""
    window = _window(np.array([centre_x, centre_y]) - a, np.array([centre_x, centre_y]) + a)
    if window is None:
        return
    rows, cols = window
    y = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] - np.float32(centre_y)
    x = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] - np.float32(centre_x)
    cos, sin = np.float32(np.cos(np.deg2rad(angle_deg))), np.float32(np.sin(np.deg2rad(angle_deg)))
    rho = np.sqrt(((x * cos + y * sin) / a) ** 2 + ((y * cos - x * sin) / b) ** 2)
    bone[window] += _shell_attenuation(rho, b)


def _add_soft_tissue(soft: np.ndarray, start: np.ndarray, end: np.ndarray, radius: float, depth: float) -> None:
    """Raise the soft-tissue thickness map to a rounded capsule (max: overlapping parts merge)."""
    found = _segment_coordinates(start, end, radius)
    if found is None:
        return
    window, _, distance = found
    np.maximum(soft[window], depth * np.sqrt(np.clip(1 - (distance / radius) ** 2, 0, None)), out=soft[window])


def _finger_bone_profiles(bone_count: int) -> list[tuple[float, float, float]]:
    """(base, shaft, head) radius profiles of a finger's bones, metacarpal first."""
    phalanges = ["proximal", "middle", "distal"] if bone_count == 4 else ["proximal", "distal"]
    return [_METACARPAL_PROFILE, *(_PHALANX_PROFILES[name] for name in phalanges)]


def _render(hand: _Hand, rng: np.random.Generator) -> np.ndarray:
    """Project the hand to an X-ray-like uint8 image (bright = attenuating, like a radiograph)."""
    soft, bone = _draw_hand(hand)
    attenuation = rng.uniform(0.011, 0.016) * ndimage.gaussian_filter(soft, 3.0) + rng.uniform(0.85, 1.15) * bone
    height, width = PHANTOM_IMAGE_SIZE
    gradient_angle = rng.uniform(0, 2 * np.pi)
    x = np.cos(gradient_angle) * (np.arange(width, dtype=np.float32) - width / 2) / max(height, width)
    y = np.sin(gradient_angle) * (np.arange(height, dtype=np.float32) - height / 2) / max(height, width)
    background = rng.uniform(15.0, 40.0) + rng.uniform(5.0, 25.0) * (y[:, None] + x[None, :])
    # Logarithmic display compresses thick parts gently, so cortex stays visible over marrow.
    image = background + rng.uniform(135.0, 160.0) * np.log1p(attenuation)
    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 0.9))
    noise_sigma = np.sqrt(9.0 + 0.15 * np.clip(image, 0, None))  # photon noise grows with the signal
    image = image + noise_sigma * rng.standard_normal((height, width), dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _draw_hand(hand: _Hand) -> tuple[np.ndarray, np.ndarray]:
    """Soft-tissue thickness map and bone attenuation map of the hand, both (H, W) float32."""
    soft = np.zeros(PHANTOM_IMAGE_SIZE, dtype=np.float32)
    bone = np.zeros(PHANTOM_IMAGE_SIZE, dtype=np.float32)
    for chain, finger_radius in zip(hand.finger_chains, hand.finger_radii):
        tip_direction = (chain[-1] - chain[-2]) / np.linalg.norm(chain[-1] - chain[-2])
        _add_soft_tissue(soft, chain[1], chain[-1] + 1.5 * finger_radius * tip_direction, 1.8 * finger_radius, 22.0)
        _add_soft_tissue(soft, chain[0], chain[1], 2.3 * finger_radius, 30.0)
        for bone_index, (base, shaft, head) in enumerate(_finger_bone_profiles(len(chain) - 1)):
            start, end = chain[bone_index], chain[bone_index + 1]
            direction = (end - start) / np.linalg.norm(end - start)
            # Joint ends stop half a joint gap short of the joint centre; the tip ends on the landmark.
            start_trim = base * finger_radius + (0.0 if bone_index == 0 else _HALF_JOINT_GAP_PX)
            end_trim = 0.0 if bone_index == len(chain) - 2 else _HALF_JOINT_GAP_PX + head * finger_radius
            _add_bone(
                bone,
                start + start_trim * direction,
                end - end_trim * direction,
                base * finger_radius,
                shaft * finger_radius,
                head * finger_radius,
            )

    wrist = hand.forearm_ends[:, 1].mean(0)
    palm_half_width = 0.6 * np.linalg.norm(hand.finger_chains[4][1] - hand.finger_chains[1][1]) + 8.0
    _add_soft_tissue(soft, wrist, hand.finger_chains[2][1], palm_half_width, 34.0)
    forearm_half_width = 1.05 * np.linalg.norm(hand.forearm_ends[0, 1] - hand.forearm_ends[1, 1]) + 22.0
    _add_soft_tissue(soft, wrist, hand.forearm_ends[:, 0].mean(0), forearm_half_width, 48.0)
    for (proximal, distal), (shaft_radius, flare_radius) in zip(hand.forearm_ends, hand.forearm_radii):
        _add_bone(bone, proximal, distal, shaft_radius, shaft_radius, flare_radius)
    for carpal in hand.carpals:
        _add_carpal(bone, *carpal)
    return soft, bone
