"""Licence-free semantic parsing of a talking-head clip: background, head (with hair), neck, torso.

There are no BiSeNet weights to ship, so the parser is built from MediaPipe landmarks, MediaPipe's person
segmentation network (segmentation.py: person vs background only, no face or clothes classes) and image cues of a
static-camera clip:

1. Per clip (`fit_clip_model`), on ~40 evenly spaced frames at low resolution: GrabCut seeded by the landmarks
   (face inside the jaw = person, top corners = background, a head ellipse and a body trapezoid = probably
   person) gives person masks; from them come the static background (temporal median over the frames where a
   pixel is background, and whether it was ever seen) and colour histograms (person vs background, skin vs
   clothes, hair vs clothes) stored as log-likelihood-ratio lookup tables.
2. Per frame (`parse_frame`): person score = colour evidence + difference from the background (where it was
   seen; pixels never uncovered lean to "person") + landmark priors + the network's log-odds (decisive where it is
   sure: a still bookcase in the clothes' colours is background), smoothed, thresholded at low resolution,
   upsampled; then geometry from the landmarks splits the person: head = above the cheekbone line or inside the
   jaw-widened face oval, plus hair-coloured person pixels hanging below it; neck = skin-coloured person pixels
   in a band under the chin; torso = the rest.

Labels (uint8): 0 background, 1 head, 2 neck, 3 torso. `PALETTE` maps them to the peers' BiSeNet colours
(RGB: head (0, 0, 255), neck (0, 255, 0), torso (255, 0, 0), background (255, 255, 255)); files are palette
PNGs that PIL reads as those RGB colours and cv2.imread as the matching BGR ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from egstalker.preprocess.face import CHIN, FACE_LEFT_EDGE, FACE_OVAL, FACE_RIGHT_EDGE, FOREHEAD

BACKGROUND, HEAD, NECK, TORSO = 0, 1, 2, 3
PALETTE = np.array([[255, 255, 255], [0, 0, 255], [0, 255, 0], [255, 0, 0]], np.uint8)
"""RGB colour of each label."""

LUT_BITS = 4  # colour histograms over 16x16x16 bins
SEGMENTATION_WEIGHT = 2.0
"""Weight of the person segmentation network's clipped log-odds (+-4) in the person score."""
_LOWER_OVAL = FACE_OVAL[FACE_OVAL.index(FACE_LEFT_EDGE):FACE_OVAL.index(FACE_RIGHT_EDGE) + 1]  # jaw, via the chin


def reduction_factor(width: int, height: int, min_side: int = 128) -> int:
    """Power-of-two downscale (1, 2, 4, 8) keeping the short side >= min_side (cv2 can decode JPEG at it)."""
    factor = 1
    while factor < 8 and min(width, height) / (factor * 2) >= min_side:
        factor *= 2
    return factor


def imread_reduced(path: str, factor: int) -> np.ndarray:
    """BGR image decoded directly at 1/factor size (JPEG DCT scaling: much faster than decode + resize)."""
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
    return cv2.imread(path, flags)


@dataclass
class FaceGeometry:
    """Landmark-derived shapes of one frame, in pixels of the image they were scaled to."""

    oval: np.ndarray  # [36, 2] face silhouette
    centre: np.ndarray  # [2]
    width: float  # cheek-to-cheek distance
    height: float  # forehead-to-chin distance
    chin: np.ndarray  # [2]
    cheek_y: float  # image row of the cheek edges (about eye level): above it everything of the person is head

    @classmethod
    def from_landmarks(cls, landmarks: np.ndarray, scale: float = 1.0) -> "FaceGeometry":
        """landmarks: [478, 2+] pixels of the full frame; scale: size of the target image / full frame."""
        points = landmarks[:, :2].astype(np.float64) * scale
        oval = points[FACE_OVAL]
        width = float(np.linalg.norm(points[FACE_LEFT_EDGE] - points[FACE_RIGHT_EDGE]))
        height = float(np.linalg.norm(points[FOREHEAD] - points[CHIN]))
        cheek_y = float(max(points[FACE_LEFT_EDGE, 1], points[FACE_RIGHT_EDGE, 1]))
        return cls(oval, oval.mean(0), width, height, points[CHIN], cheek_y)

    def scaled_oval(self, sx: float, sy: float = 1.0, dy: float = 0.0) -> np.ndarray:
        return (self.oval - self.centre) * (sx, sy) + self.centre + (0.0, dy)


def _poly_mask(shape: tuple[int, int], polygon: np.ndarray) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1)
    return mask.astype(bool)


def _ellipse_mask(shape, centre, axes) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.ellipse(mask, (int(round(centre[0])), int(round(centre[1]))),
                (max(1, int(round(axes[0]))), max(1, int(round(axes[1])))), 0, 0, 360, 1, -1)
    return mask.astype(bool)


def prior_regions(shape: tuple[int, int], geometry: FaceGeometry) -> dict[str, np.ndarray]:
    """Landmark priors [H, W] bool: 'face' (surely person), 'head' (hair ellipse), 'body' (below the chin),
    'likely' (head | body: where the person can be), 'corners' (top corners away from the head: surely bg)."""
    h, w = shape
    g = geometry
    face = _poly_mask(shape, g.scaled_oval(0.92, 0.95))
    head = _ellipse_mask(shape, g.centre - (0, 0.15 * g.height), (0.75 * g.width, 0.85 * g.height))
    neck_top = g.chin[1] - 0.1 * g.height
    shoulders = g.chin[1] + 0.9 * g.height
    x = g.chin[0]
    body = np.array([[x - 0.6 * g.width, neck_top], [x + 0.6 * g.width, neck_top],
                     [x + 2.0 * g.width, shoulders], [x + 2.4 * g.width, h + g.height],
                     [x - 2.4 * g.width, h + g.height], [x - 2.0 * g.width, shoulders]])
    body_mask = _poly_mask(shape, body)
    likely = head | body_mask | face
    # beside and above the head, above the cheek line (shoulders are lower, hair narrower): background
    corners = ~_ellipse_mask(shape, g.centre - (0, 0.15 * g.height), (1.0 * g.width, 1.05 * g.height))
    corners[int(max(0, g.cheek_y)):] = False
    corners &= ~body_mask
    return {"face": face, "head": head, "body": body_mask, "likely": likely, "corners": corners}


def grabcut_person(image: np.ndarray, geometry: FaceGeometry, iterations: int = 3) -> np.ndarray:
    """[H, W] bool person mask of one (small) BGR frame by GrabCut seeded with landmark priors."""
    regions = prior_regions(image.shape[:2], geometry)
    mask = np.full(image.shape[:2], cv2.GC_PR_BGD, np.uint8)
    mask[regions["likely"]] = cv2.GC_PR_FGD
    mask[regions["corners"]] = cv2.GC_BGD
    mask[regions["face"]] = cv2.GC_FGD
    g = geometry
    # a column under the chin down to the bottom is neck, then chest or clothes: person
    strip = np.array([[g.chin[0] - 0.15 * g.width, g.chin[1]], [g.chin[0] + 0.15 * g.width, g.chin[1]],
                      [g.chin[0] + 0.3 * g.width, image.shape[0]], [g.chin[0] - 0.3 * g.width, image.shape[0]]])
    mask[_poly_mask(image.shape[:2], strip)] = cv2.GC_FGD
    if not (mask == cv2.GC_BGD).any():  # GrabCut needs both seeds: a far band of the top row is bg
        mask[0, :] = np.where(regions["likely"][0], mask[0], cv2.GC_BGD)
    if not ((mask == cv2.GC_BGD) | (mask == cv2.GC_PR_BGD)).any():
        return regions["likely"]
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(image, mask, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def _colour_bins(image: np.ndarray) -> np.ndarray:
    q = (image >> (8 - LUT_BITS)).astype(np.int32)
    return (q[..., 0] << (2 * LUT_BITS)) | (q[..., 1] << LUT_BITS) | q[..., 2]


def colour_llr_lut(positive: np.ndarray, negative: np.ndarray, clip: float = 4.0) -> np.ndarray:
    """Log-likelihood ratio lookup table [16**3] float32 of colour bins, from BGR pixel lists [M, 3] uint8."""
    from scipy.ndimage import gaussian_filter

    n = 1 << LUT_BITS

    def density(pixels):
        hist = np.bincount(_colour_bins(pixels[None]).ravel(), minlength=n ** 3).astype(np.float64)
        hist = gaussian_filter(hist.reshape(n, n, n), 0.8).ravel()
        return hist / max(hist.sum(), 1.0) + 1e-5

    if len(positive) == 0 or len(negative) == 0:
        return np.zeros(n ** 3, np.float32)
    return np.clip(np.log(density(positive) / density(negative)), -clip, clip).astype(np.float32)


@dataclass
class ClipModel:
    """What the parser learns once per clip (at low resolution `factor`)."""

    factor: int
    background: np.ndarray  # [h, w, 3] float32 BGR median background
    seen: np.ndarray  # [h, w] float32: fraction of sample frames in which the pixel was background
    noise: float  # typical colour distance of background pixels to the median
    person_lut: np.ndarray  # person vs background colours
    skin_mean: np.ndarray  # [3] YCrCb mean of face skin
    skin_inv_cov: np.ndarray  # [2, 2] inverse covariance of its chroma (Cr, Cb)
    hair_lut: np.ndarray  # hair (above the forehead) vs clothes, skin and background
    hair_distinct: bool  # hair colours differ from the clothes: long hair below the jaw can be told apart
    content: tuple[int, int, int, int] | None = None  # (top, bottom, left, right) of the picture inside black
    # padding bars, in pixels of the small frames; None: no bars (the whole frame is the scene)


def content_box(images: list[np.ndarray], dark: int = 24) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the picture inside black padding bars (a clip letter- or pillarboxed into
    another frame shape): whole edge rows / columns near-black and unchanging in every sample frame (at least 2 %
    of the side). None when there are none."""
    stack = np.stack(images)
    # black and still: a very dark suit or shadow at the frame's edge moves and has grain, padding does not
    black = (stack.max(axis=(0, 3)) < dark) & ((stack.max(0).astype(np.int16) - stack.min(0)).max(-1) <= 8)
    h, w = black.shape

    def span(lines: np.ndarray) -> tuple[int, int]:
        start, stop = 0, len(lines)
        while start < stop and lines[start]:
            start += 1
        while stop > start and lines[stop - 1]:
            stop -= 1
        return start, stop

    top, bottom = span(black.all(1))
    left, right = span(black.all(0))
    # bars shorter than 2 % of the side are a dark frame edge, not padding; nothing left: no bars either
    top, left = (top if top >= 0.02 * h else 0), (left if left >= 0.02 * w else 0)
    bottom, right = (bottom if h - bottom >= 0.02 * h else h), (right if w - right >= 0.02 * w else w)
    if (top, bottom, left, right) == (0, h, 0, w) or bottom - top < 0.25 * h or right - left < 0.25 * w:
        return None
    return top, bottom, left, right


def _crop(image: np.ndarray, landmarks: np.ndarray, content, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """The picture inside the bars and its landmarks (full-frame pixels, shifted to the cut)."""
    if content is None:
        return image, landmarks
    top, bottom, left, right = content
    shifted = landmarks.astype(np.float64).copy()
    shifted[:, 0] -= left * factor
    shifted[:, 1] -= top * factor
    return image[top:bottom, left:right], shifted


def fit_clip_model(images: list[np.ndarray], landmarks: list[np.ndarray], factor: int) -> ClipModel:
    """Learn the background and colour models from sample frames.

    Black padding bars (`content_box`) are no part of the scene: the models are learnt from the picture inside
    them (black bars as background would make a dark suit background; as person, they would be torso).

    Args:
        images: small BGR frames [h, w, 3] uint8 (decoded at 1/factor).
        landmarks: per image [478, 3] landmarks in full-frame pixels.
    """
    content = content_box(images)
    if content is not None:
        cut = [_crop(image, points, content, factor) for image, points in zip(images, landmarks)]
        images, landmarks = [c[0] for c in cut], [c[1] for c in cut]
    masks, geometries = [], []
    for image, points in zip(images, landmarks):
        geometry = FaceGeometry.from_landmarks(points, 1.0 / factor)
        geometries.append(geometry)
        masks.append(grabcut_person(image, geometry))
    stack = np.stack(images).astype(np.float32)
    person = np.stack(masks)
    # a margin around the person: edges blend person and background colours
    kernel = np.ones((3, 3), np.uint8)
    grown = np.stack([cv2.dilate(m.astype(np.uint8), kernel, iterations=2).astype(bool) for m in person])
    is_bg = ~grown
    seen = is_bg.mean(0).astype(np.float32)
    masked = np.where(is_bg[..., None], stack, np.nan)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            background = np.nanmedian(masked, axis=0)
    background = np.where(np.isnan(background), stack.mean(0), background).astype(np.float32)
    distance = np.linalg.norm(stack - background, axis=-1)
    noise = float(np.median(distance[is_bg])) if is_bg.any() else 8.0

    # colour samples
    fg_pixels = stack[person].astype(np.uint8)
    bg_pixels = stack[is_bg].astype(np.uint8)
    skin, clothes, hair = [], [], []
    for image, mask, g in zip(images, masks, geometries):
        shape = image.shape[:2]
        face_core = _poly_mask(shape, g.scaled_oval(0.6, 0.55, dy=0.12 * g.height))
        skin.append(image[face_core & mask])
        below = np.zeros(shape, bool)  # clothes: under the neck, in the middle (long hair hangs at the sides)
        top = int(min(shape[0] - 1, g.chin[1] + 0.45 * g.height))
        below[top:, int(max(0, g.chin[0] - 0.35 * g.width)):int(max(0, g.chin[0] + 0.35 * g.width))] = True
        clothes.append(image[below & mask])
        above = _ellipse_mask(shape, g.centre - (0, 0.25 * g.height), (0.95 * g.width, 0.95 * g.height))
        above &= ~_poly_mask(shape, g.scaled_oval(1.05, 1.05, dy=0.05 * g.height))
        above[int(max(0, g.cheek_y)):] = False
        hair.append(image[above & mask])
    skin, clothes, hair = (np.concatenate(x) if x else np.zeros((0, 3), np.uint8) for x in (skin, clothes, hair))
    skin_ycc = cv2.cvtColor(skin[None], cv2.COLOR_BGR2YCrCb)[0].astype(np.float64) if len(skin) else \
        np.array([[150.0, 150.0, 110.0]])
    skin_mean = skin_ycc.mean(0)
    chroma_cov = np.cov(skin_ycc[:, 1:].T) + np.eye(2) * 4.0 if len(skin_ycc) > 2 else np.eye(2) * 25.0
    hair_lut = colour_llr_lut(hair, np.concatenate([clothes, skin, bg_pixels[::7]]))
    hair_distinct = bool(len(hair) > 50 and len(clothes) > 50 and (hair_lut[_colour_bins(hair[None])] > 1.0).mean() > 0.5
                         and (hair_lut[_colour_bins(clothes[None])] > 1.0).mean() < 0.1)
    return ClipModel(
        factor=factor, background=background, seen=seen, noise=max(noise, 2.0),
        person_lut=colour_llr_lut(fg_pixels, bg_pixels), skin_mean=skin_mean.astype(np.float32),
        skin_inv_cov=np.linalg.inv(chroma_cov).astype(np.float32), hair_lut=hair_lut, hair_distinct=hair_distinct,
        content=content,
    )


def skin_distance(image: np.ndarray, model: ClipModel) -> np.ndarray:
    """[H, W] Mahalanobis distance of each pixel's chroma to the face skin; too dark pixels get +inf-like 99."""
    ycc = cv2.cvtColor(image, cv2.COLOR_BGR2YCrCb).astype(np.float32)
    d = ycc[..., 1:] - model.skin_mean[1:]
    dist = np.sqrt(np.einsum("...i,ij,...j->...", d, model.skin_inv_cov, d))
    dist[ycc[..., 0] < 0.2 * model.skin_mean[0]] = 99.0
    # a white collar has skin-like (neutral) chroma next to dark skin: far brighter than the face is not skin
    dist[ycc[..., 0] > model.skin_mean[0] + 70.0] = 99.0
    return dist


def person_score(image_small: np.ndarray, geometry_small: FaceGeometry, model: ClipModel,
                 regions: dict[str, np.ndarray] | None = None,
                 person_confidence: np.ndarray | None = None) -> np.ndarray:
    """[h, w] float32 evidence that a pixel is the person (> 0) rather than background (< 0).
    regions: prior_regions(image_small.shape[:2], geometry_small), when the caller has them already.
    person_confidence: [h, w] in [0, 1] from a person segmentation network (segmentation.PersonSegmenter)."""
    shape = image_small.shape[:2]
    bins = _colour_bins(image_small)
    score = 0.6 * model.person_lut[bins]
    distance = np.linalg.norm(image_small.astype(np.float32) - model.background, axis=-1)
    threshold = 3.0 * model.noise + 6.0
    difference = np.clip((distance - threshold) / (0.5 * threshold), -3.0, 3.0)
    # trust the background difference where the background was seen often; never seen: leans to person
    trust = np.clip(model.seen / 0.1, 0.0, 1.0)
    score += trust * 1.5 * difference + (1.0 - trust) * 0.8
    if regions is None:
        regions = prior_regions(shape, geometry_small)
    score[~regions["likely"]] -= 2.0
    score[regions["corners"]] -= 4.0
    score[regions["face"]] += 10.0
    if person_confidence is not None:
        # the network's log-odds, clipped: where it is sure it outweighs the colour and background cues (which
        # take a still bookcase in clothes' colours for person); near 0.5, at its soft edges, they decide
        p = np.clip(person_confidence, 1e-3, 1.0 - 1e-3)
        score += SEGMENTATION_WEIGHT * np.clip(np.log(p / (1.0 - p)), -4.0, 4.0)
    return cv2.GaussianBlur(score, (0, 0), 1.0)


def _keep_connected(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Components of `mask` touching `seed`, holes filled."""
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    keep = np.zeros(count, bool)  # a lookup table: much faster than np.isin on every pixel
    keep[labels[seed & mask]] = True
    keep[0] = False
    out = keep[labels]
    # fill holes: background components not touching the border
    count, labels = cv2.connectedComponents((~out).astype(np.uint8), connectivity=4)
    hole = np.ones(count, bool)
    hole[0] = False
    hole[labels[0]] = hole[labels[-1]] = hole[labels[:, 0]] = hole[labels[:, -1]] = False
    return out | hole[labels]


def parse_frame(image_small: np.ndarray, landmarks: np.ndarray, model: ClipModel,
                full_size: tuple[int, int], segment=None) -> np.ndarray:
    """Labels [H, W] uint8 (0 bg, 1 head, 2 neck, 3 torso) of one frame at full size (width, height).

    All the per-frame geometry runs at the small size (1/model.factor: ~16x fewer pixels at 512 px); only the
    final soft person / head / neck indicators are upsampled (bilinear, then thresholded), so edges stay smooth.

    Args:
        image_small: the frame decoded at 1/model.factor, BGR uint8.
        landmarks: [478, 3] landmarks in full-frame pixels.
        segment: a person segmenter (image BGR -> [h, w] confidence; segmentation.PersonSegmenter), or None
            for the colour model alone.
    """
    if model.content is not None:  # the picture inside black padding bars; the bars are background
        width, height = full_size
        small_height, small_width = image_small.shape[:2]
        top, bottom, left, right = model.content
        sx, sy = width / small_width, height / small_height
        y0, y1 = int(round(top * sy)), int(round(bottom * sy))
        x0, x1 = int(round(left * sx)), int(round(right * sx))
        image_cut, landmarks_cut = _crop(image_small, landmarks, model.content, model.factor)
        labels = np.full((height, width), BACKGROUND, np.uint8)
        labels[y0:y1, x0:x1] = _parse_picture(image_cut, landmarks_cut, model, (x1 - x0, y1 - y0), segment)
        return labels
    return _parse_picture(image_small, landmarks, model, full_size, segment)


def _parse_picture(image_small: np.ndarray, landmarks: np.ndarray, model: ClipModel,
                   full_size: tuple[int, int], segment=None) -> np.ndarray:
    width, height = full_size
    g = FaceGeometry.from_landmarks(landmarks, 1.0 / model.factor)
    shape = image_small.shape[:2]
    small_height, small_width = shape
    regions = prior_regions(shape, g)
    score = person_score(image_small, g, model, regions, None if segment is None else segment(image_small))
    person = _keep_connected(score > 0, regions["face"])
    skin_d = cv2.GaussianBlur(skin_distance(image_small, model), (0, 0), 1.0)

    head_zone = _poly_mask(shape, g.scaled_oval(1.22, 1.0))
    head_zone[: int(max(0, round(g.cheek_y)))] = True
    head = person & head_zone
    # hair hanging below the cheek line, next to the head
    hanging = np.zeros(shape, bool)
    if model.hair_distinct:
        side = _ellipse_mask(shape, (g.centre[0], g.chin[1]), (1.5 * g.width, 1.6 * g.height))
        # hair strands mix hair and background colours at this scale: a lenient threshold
        hair = cv2.GaussianBlur(model.hair_lut[_colour_bins(image_small)], (0, 0), 1.2) > 0.0
        hanging = person & ~head & hair & side
        # long hair falls beside the neck, not in front of it (a shadowed neck can look hair-coloured)
        centre_band = slice(int(max(0, g.chin[0] - 0.35 * g.width)), int(max(0, g.chin[0] + 0.35 * g.width)))
        hanging[int(max(0, g.chin[1])):, centre_band] = False
    if hanging.any():
        hanging = _keep_connected(hanging | head, head) & ~head & hanging
        head |= hanging
    neck_band = np.array([[g.chin[0] - 0.42 * g.width, g.chin[1] - 0.3 * g.height],
                          [g.chin[0] + 0.42 * g.width, g.chin[1] - 0.3 * g.height],
                          [g.chin[0] + 0.5 * g.width, g.chin[1] + 0.9 * g.height],
                          [g.chin[0] - 0.5 * g.width, g.chin[1] + 0.9 * g.height]])
    # skin-coloured; right under the jaw the neck is in shadow: a looser colour match there
    skin = skin_d < 3.0
    upper = int(np.clip(g.chin[1] + 0.2 * g.height, 0, small_height))
    skin[:upper] |= skin_d[:upper] < 4.5
    neck = person & ~head & skin & _poly_mask(shape, neck_band)
    if neck.any():
        neck = _keep_connected(neck, cv2.dilate(head.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool))
        neck &= person & ~head

    # upsample: the person edge from the (clamped) score, the part edges from their indicators
    soft_person = np.where(person, np.maximum(score, 0.5), np.minimum(score, -0.5)).astype(np.float32)
    parts = np.dstack([soft_person, head.astype(np.float32) - 0.5, neck.astype(np.float32) - 0.5])
    if (small_width, small_height) != (width, height):
        parts = cv2.resize(parts, (width, height), interpolation=cv2.INTER_LINEAR)
    labels = np.full((height, width), TORSO, np.uint8)
    labels[parts[..., 1] > 0] = HEAD
    labels[parts[..., 2] > 0] = NECK
    labels[parts[..., 0] <= 0] = BACKGROUND
    return labels


def labels_to_rgb(labels: np.ndarray) -> np.ndarray:
    return PALETTE[labels]


def save_labels_png(labels: np.ndarray, path) -> None:
    """Palette PNG (about 2-5 KB at 512x512) that reads back as the PALETTE's RGB colours."""
    from PIL import Image

    image = Image.fromarray(labels, mode="P")
    image.putpalette(PALETTE.ravel().tolist())
    image.save(path, format="PNG", optimize=False, compress_level=3)  # half the time of 6, ~15 % larger


def load_labels(path) -> np.ndarray:
    """Labels [H, W] uint8 from a parsing PNG (ours, palette; or a peer's RGB one)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode == "P" and len(image.getpalette() or []) >= 12 and \
                np.array_equal(np.array(image.getpalette()[:12], np.uint8).reshape(4, 3), PALETTE):
            return np.asarray(image, np.uint8).copy()
        rgb = np.asarray(image.convert("RGB"))
    labels = np.zeros(rgb.shape[:2], np.uint8)
    for label, colour in enumerate(PALETTE):
        labels[(rgb == colour).all(-1)] = label
    return labels
