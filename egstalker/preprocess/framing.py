"""Task 3's framing: a square around the speaker, at most 512 px, from any camera or phone video.

The peers expect a 512x512 clip with the head filling about half of it and leave the cropping to the user. A
phone films 1080x1920 or 1920x1080 instead: kept whole, a 5-minute clip's dataset takes several GB, the CPU
preview trains a 72x128 head, and a GPU trains eight times the pixels of 512x512. So task 3 looks at a few
frames first (seeking, not decoding the whole video), finds the face in them, and writes every frame cropped to
one fixed square around the speaker (fixed, so the background stays still for task 5; a rectangle when the head
travels further than the frame's shorter side) and scaled down to at most
`FramesConfig.max_size`. Cropping never removes face pixels: a crop is only ever narrower than the frame, never
upscaled, and a clip framed as the peers frame theirs (every test clip but the upper-body one) is kept whole.

MediaPipe's landmarker finds a face only when it is more than about a tenth of the picture's longer side (its
detector sees the picture at 128x128): a face under ~20 % of a 1280x720 frame's height (a waist-up or wider shot)
is missed. A sampled frame without a face is therefore searched again in overlapping square tiles, halving in size
(1280x720: 6 tiles of 640 px, 28 of 320 px, 120 of 160 px), until one level finds it, and the face found is
mapped back to the frame; two people found so in most samples are refused. Cropped around it, later tasks see the
face about half the frame's height. A face still under `MIN_FACE_PX` is refused (too few pixels to learn a mouth
from), and a close-up that leaves no room under the chin is warned about (the model learns the neck and shoulders
too)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from egstalker.errors import EgstalkerError, EgstalkerWarning

FACE_SHARE = 0.5
"""Face height (MediaPipe mesh, forehead to chin) over the crop's side: the peers' framing (obama's 450x450
benchmark clip 0.51, the HDTF-style test clips 0.60-0.61, lieu 0.63)."""
FACE_CENTRE_HEIGHT = 0.55
"""Where the face's centre sits in the crop, as a fraction of its side from the top (the test clips: 0.53-0.57),
leaving the lower part for the neck and shoulders."""
MOTION_MARGIN = 1.2
"""The crop holds the union of the sampled face boxes (the head's motion) with this much room."""
SAMPLES = 16
"""Frames looked at to place the crop, spread over the clip."""
CROP_MODES = ("auto", "none")
MIN_FACE_PX = 40
"""Smallest face height (median over the samples, in the video's pixels) task 3 accepts."""
TILE_MIN = 160
"""Smallest tile side of the closer search. The landmarker finds faces down to ~0.11-0.12 of a tile's side
(obama laid small on grey canvases: 256 px tiles found 30 px faces, 360 px ones 45 px but not 30), so the finest
levels (720p: 160 px tiles, 1080p: 240 px) still find faces under `MIN_FACE_PX` and name them too small."""
TILE_MAX_COUNT = 160
"""Finer levels with more tiles than this are not searched (a 4K frame stops at 480 px tiles: 120 of them)."""
CLOSE_UP_SHARE = 0.8
"""Face height over the framed picture's height above which the close-up is warned about."""


@dataclass(frozen=True)
class Framing:
    """Where each video frame is cut and what size it is written at."""

    x: int
    y: int
    crop_width: int
    crop_height: int
    width: int
    """Written frame size."""
    height: int

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The frame cropped and, when smaller, resized (area-averaged, as for any downscale)."""
        import cv2

        if self.is_identity:
            return image
        image = image[self.y:self.y + self.crop_height, self.x:self.x + self.crop_width]
        if (self.width, self.height) != (self.crop_width, self.crop_height):
            image = cv2.resize(image, (self.width, self.height), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(image)

    @property
    def is_identity(self) -> bool:
        return self.x == 0 and self.y == 0 and (self.width, self.height) == (self.crop_width, self.crop_height)


def _even(value: float) -> int:
    """Video encoders (H.264 in 4:2:0) want even sizes."""
    return max(2, int(value) // 2 * 2)


def _fit(wanted: float, limit: int) -> int:
    """A crop's size along one axis: what is wanted (made even), or the whole axis as it is when that is less."""
    return limit if wanted >= limit else _even(wanted)


def check_settings(crop: str, max_size: int) -> None:
    """Refuse framing settings task 3 cannot use (checked before preprocessing writes anything)."""
    if crop not in CROP_MODES:
        raise EgstalkerError(f"unknown crop mode {crop!r}; use one of {', '.join(CROP_MODES)}")
    if max_size < 0 or 0 < max_size < 64:
        raise EgstalkerError(f"max size {max_size} px cannot show a mouth; use at least 64 (512 is the peers' "
                             "size) or 0 to keep the video's size")


def _place(start: float, size: int, reach_centre: float, reach: float, limit: int) -> int:
    """A crop's first pixel along one axis: `start`, moved as little as needed to hold the head's reach (centred
    on `reach_centre`) where the crop is large enough, and kept inside [0, limit)."""
    if reach <= size:
        start = min(max(start, reach_centre + reach / 2 - size), reach_centre - reach / 2)
    else:
        start = reach_centre - size / 2
    return int(round(min(max(start, 0), limit - size)))


def plan_framing(face_boxes: np.ndarray, width: int, height: int, crop: str = "auto",
                 max_size: int = 512) -> Framing:
    """The framing of a `width` x `height` video whose sampled frames show faces in `face_boxes` ([n, 4]: x0, y0,
    x1, y1 in pixels; n may be 0).

    crop 'auto': a square around the face `FACE_SHARE` of its side tall, the face centre at `FACE_CENTRE_HEIGHT`,
    moved and enlarged so it holds every sampled face box with `MOTION_MARGIN`, kept inside the frame (a head that
    travels further than the frame's shorter side gets a rectangle as wide as it travels); a frame already framed
    that way is kept whole. 'none', or no face sampled: the whole frame.
    Then frames larger than `max_size` on their longer side are scaled down to it (0: never)."""
    check_settings(crop, max_size)
    x, y, crop_w, crop_h = 0, 0, width, height
    boxes = np.asarray(face_boxes, np.float64).reshape(-1, 4)
    if crop == "auto" and len(boxes):
        face_h = float(np.median(boxes[:, 3] - boxes[:, 1]))
        centre = np.median(boxes[:, :2] + boxes[:, 2:], axis=0) / 2
        lo, hi = boxes[:, :2].min(0), boxes[:, 2:].max(0)  # where the head went in the samples
        reach = MOTION_MARGIN * (hi - lo)
        side = min(max(face_h / FACE_SHARE, float(reach.max())), width, height)
        # a square, unless the head reaches further than the frame's shorter side: then as far as it reaches
        size_w, size_h = _fit(max(side, reach[0]), width), _fit(max(side, reach[1]), height)
        if (size_w, size_h) != (width, height):
            x = _place(centre[0] - size_w / 2, size_w, (lo[0] + hi[0]) / 2, reach[0], width)
            y = _place(centre[1] - FACE_CENTRE_HEIGHT * size_h, size_h, (lo[1] + hi[1]) / 2, reach[1], height)
            crop_w, crop_h = size_w, size_h
    out_w, out_h = crop_w, crop_h
    longer = max(crop_w, crop_h)
    if max_size and longer > max_size:
        out_w, out_h = _even(crop_w * max_size / longer), _even(crop_h * max_size / longer)
    return Framing(x, y, crop_w, crop_h, out_w, out_h)


def tile_levels(width: int, height: int) -> list[list[tuple[int, int, int, int]]]:
    """The closer search's tiles (x, y, width, height) of a `width` x `height` frame, coarsest level first: squares
    of half the frame's longer side, then a quarter, ... (cut to the frame where it is narrower), overlapping by
    half their side, so every face up to half a tile's side lies wholly in one tile of its level."""
    def starts(limit: int, side: int) -> list[int]:
        """Evenly spaced, at most half a side apart, the last one ending at the frame's edge."""
        if side >= limit:
            return [0]
        steps = -(-2 * (limit - side) // side)  # ceil((limit - side) / (side / 2))
        return [round(k * (limit - side) / steps) for k in range(steps + 1)]

    levels = []
    side = max(width, height) // 2
    while side >= TILE_MIN:
        tiles = [(x, y, min(side, width), min(side, height))
                 for y in starts(height, side) for x in starts(width, side)]
        if len(tiles) > TILE_MAX_COUNT:
            break
        levels.append(tiles)
        side //= 2
    return levels


def _box(points: np.ndarray) -> list[float]:
    return [*points[:, :2].min(0), *points[:, :2].max(0)]


def _same_face(a, b) -> bool:
    """Whether two boxes are one face (the centre of either lies in the other)."""
    def inside(p, q):
        cx, cy = (p[0] + p[2]) / 2, (p[1] + p[3]) / 2
        return q[0] <= cx <= q[2] and q[1] <= cy <= q[3]
    return inside(a, b) or inside(b, a)


def search_tiles(landmarker, rgb: np.ndarray) -> list[list[float]]:
    """The faces (boxes in the frame's pixels, one per person) the landmarker finds in the tiles of the first
    level of `tile_levels` that finds any; [] when none does. A face seen by several overlapping tiles counts once,
    with its box from the tile where it sits most centrally (a face at a tile's edge may be cut)."""
    from egstalker.preprocess.face import landmarks_in_image

    height, width = rgb.shape[:2]
    for tiles in tile_levels(width, height):
        found = []  # (distance of the face's centre from its tile's centre, over the tile's side; box)
        for x, y, w, h in tiles:
            points = landmarks_in_image(landmarker, rgb[y:y + h, x:x + w])
            if points is not None:
                box = _box(points + np.array([x, y, 0], np.float32))
                off = max(abs((box[0] + box[2]) / 2 - x - w / 2), abs((box[1] + box[3]) / 2 - y - h / 2))
                found.append((off / max(w, h), box))
        faces: list[list[float]] = []
        for _, box in sorted(found, key=lambda item: item[0]):
            if not any(_same_face(box, kept) for kept in faces):
                faces.append(box)
        if faces:
            return faces
    return []


def sample_face_boxes(video_path: str, duration: float, samples: int = SAMPLES,
                      report: dict | None = None) -> tuple[np.ndarray, int]:
    """Face boxes ([n, 4] x0, y0, x1, y1, pixels) of the one face in up to `samples` frames spread over the clip
    (MediaPipe's landmarker, the model tasks 4-8 use), and how many frames were looked at. A frame where the whole
    picture shows no face is searched closer (`search_tiles`); one where that finds two people is left out.
    `report`, when given, receives the counts of frames found by that search and of frames with two people."""
    import cv2

    from egstalker.media import sample_frames
    from egstalker.preprocess.face import image_landmarker, landmarks_in_image

    times = [(k + 0.5) * duration / samples for k in range(samples)]
    pictures = sample_frames(video_path, times)
    boxes, tiled, crowded = [], 0, []
    with image_landmarker() as landmarker:
        for at, rgb in zip(times, pictures):
            h, w = rgb.shape[:2]
            scale = min(1.0, 960 / max(h, w))  # the landmarker works at 256 px inside: a smaller copy loses nothing
            small = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) \
                if scale < 1 else rgb
            points = landmarks_in_image(landmarker, small, (w, h))
            if points is not None:
                boxes.append(_box(points))
                continue
            faces = search_tiles(landmarker, rgb)
            if len(faces) == 1:
                boxes.append(faces[0])
                tiled += 1
            elif faces:
                crowded.append(at)
    if report is not None:
        report.update(found_in_tiles=tiled, two_people_at_s=[round(t, 1) for t in crowded])
    return np.array(boxes, np.float64).reshape(-1, 4), len(pictures)


def choose_framing(video_path: str, width: int, height: int, duration: float, crop: str,
                   max_size: int) -> tuple[Framing, dict]:
    """The framing task 3 writes with, and its report for meta.json ("framing").

    Raises EgstalkerError when most sampled frames show two people, or the face is under `MIN_FACE_PX`; warns
    (UserWarning, also in the report's "warning") when the framed face leaves no room for the neck."""
    search: dict = {}
    boxes, looked = (sample_face_boxes(video_path, duration, report=search) if crop == "auto"
                     else (np.zeros((0, 4)), 0))
    crowded = search.get("two_people_at_s", [])
    if looked and len(crowded) >= looked / 2:
        raise EgstalkerError(f"more than one face in {len(crowded)} of {looked} sampled frames (at "
                             f"{', '.join(f'{t} s' for t in crowded[:6])}); the clip must show one person only: "
                             "crop or cut the video")
    # a face in under half the samples is not the clip's speaker (tasks 4-8 refuse such clips, naming frames)
    usable = boxes if looked and len(boxes) >= looked / 2 else np.zeros((0, 4))
    if len(usable):
        face_px = float(np.median(usable[:, 3] - usable[:, 1]))
        if face_px < MIN_FACE_PX:
            raise EgstalkerError(f"the face is too small in the frame: {face_px:.0f} px tall in the {width}x{height} "
                                 f"video (at least {MIN_FACE_PX} px); film closer or give a higher-resolution video")
    framing = plan_framing(usable, width, height, crop, max_size)
    report = {
        "crop": crop,
        "max_size": int(max_size),
        "video_size": [int(width), int(height)],
        "crop_xywh": [framing.x, framing.y, framing.crop_width, framing.crop_height],
        "size": [framing.width, framing.height],
        "faces_sampled": [int(len(boxes)), int(looked)],
    }
    if search.get("found_in_tiles"):
        report["faces_found_closer"] = int(search["found_in_tiles"])
    if crowded:
        report["two_people_at_s"] = crowded
    if len(usable):
        face_h = float(np.median(usable[:, 3] - usable[:, 1])) * framing.height / framing.crop_height
        report["face_height_px"] = round(face_h, 1)
        warning = close_up_warning(usable, framing)
        if warning:
            report["warning"] = warning
            warnings.warn(warning, EgstalkerWarning, stacklevel=2)
    return framing, report


def close_up_warning(boxes: np.ndarray, framing: Framing) -> str | None:
    """A warning when the framed face (median of `boxes`, video pixels) fills nearly the picture's height
    (`CLOSE_UP_SHARE`) or its chin reaches the picture's bottom edge: the neck and shoulders are out of view."""
    face = float(np.median(boxes[:, 3] - boxes[:, 1]))
    share = face / framing.crop_height
    below_chin = framing.y + framing.crop_height - float(np.median(boxes[:, 3]))
    if share < CLOSE_UP_SHARE and below_chin > 0.05 * face:
        return None
    return (f"the face fills {share:.0%} of the framed picture's height"
            f"{' and its chin reaches the bottom edge' if below_chin <= 0.05 * face else ''}: the model needs the "
            "neck and shoulders in view (the torso is learnt too); film from further away, head and shoulders, the "
            "face about half the frame's height")
