"""Head-pose jitter and lag of the tracking smoothers (raw, the seed's EMA, One-Euro, Savitzky-Golay, Gaussian).

    python benchmarks/tracking_jitter.py [DATASET_OR_VIDEO ...] > benchmarks/results/tracking_jitter.txt

For each clip (default: every video in ../shared/data/video, faces detected once into /tmp/egstalker_jitter):
- jitter: RMS frame-to-frame acceleration (second difference) of translation (cm) and rotation (degrees);
- reprojection: median/p95 pixel error of the person's mean shape under the smoothed pose vs the landmarks
  (smoothing that lags or over-smooths moves the head away from where it is in the image);
- lag: the time shift (frames) that best aligns the smoothed yaw/pitch with the raw ones (0 = no lag).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from egstalker.dataset.layout import DatasetLayout  # noqa: E402
from egstalker.preprocess import tracking  # noqa: E402
from egstalker.preprocess.face import FaceTrack, face_cache_path  # noqa: E402

METHODS = ("none", "ema", "one_euro", "savgol", "gaussian")


def faces_of(source: Path, work: Path) -> FaceTrack:
    if source.is_dir():
        return FaceTrack.load(face_cache_path(DatasetLayout(source)))
    from egstalker.preprocess.pipeline import preprocess

    root = preprocess(source, work / source.stem, tasks=[3, 4], show_progress=False)
    return FaceTrack.load(face_cache_path(DatasetLayout(root)))


def lag_frames(raw: np.ndarray, smooth: np.ndarray, max_lag: int = 5) -> int:
    errors = [np.mean((smooth[max_lag + k: len(raw) - max_lag + k] - raw[max_lag: len(raw) - max_lag]) ** 2)
              for k in range(-max_lag, max_lag + 1)]
    return int(np.argmin(errors)) - max_lag


def main(argv: list[str]) -> int:
    from scipy.spatial.transform import Rotation

    sources = [Path(a) for a in argv] or sorted((REPO.parent / "shared" / "data" / "video").glob("*.mp4"))
    work = Path("/tmp/egstalker_jitter")
    print("clip frames method trans_jitter_cm rot_jitter_deg reproj_median_px reproj_p95_px lag_frames")
    for source in sources:
        faces = faces_of(source, work)
        width, height = faces.width, faces.height
        focal = tracking.focal_length(height)
        centre = (width / 2, height / 2)
        canonical = tracking.canonical_face()
        observed = faces.landmarks[:, :468, :2].astype(np.float64)
        rotation = faces.matrices[:, :3, :3].astype(np.float64)
        translation = faces.matrices[:, :3, 3].astype(np.float64)
        lifted = tracking.lift_landmarks(faces.landmarks.astype(np.float64), rotation, translation, focal, centre,
                                         canonical)
        person = tracking.to_canonical(lifted, rotation, translation).mean(0)[:468]
        rigid = tracking.RIGID_POINTS  # as track() fits them
        rotation, translation = tracking.solve_pnp(person[rigid], observed[:, rigid], rotation, translation, focal,
                                                   centre)
        raw_angles = np.degrees(Rotation.from_matrix(rotation).as_euler("XYZ"))
        for method in METHODS:
            r, t = tracking.smooth_poses(rotation, translation, method)
            angles = np.degrees(Rotation.from_matrix(r).as_euler("XYZ"))
            error = tracking.reprojection_error(person, r, t, focal, centre, observed)
            lag = lag_frames(raw_angles[:, :2], angles[:, :2])
            print(f"{source.stem} {len(faces)} {method} {tracking.jitter(t):.4f} {tracking.jitter(angles):.4f} "
                  f"{np.median(error):.3f} {np.percentile(error, 95):.3f} {lag}", flush=True)
        mp_error = tracking.reprojection_error(canonical, faces.matrices[:, :3, :3], faces.matrices[:, :3, 3], focal,
                                               centre, observed)
        print(f"{source.stem} {len(faces)} mediapipe_matrix+canonical_model - - {np.median(mp_error):.3f} "
              f"{np.percentile(mp_error, 95):.3f} -", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
