"""The preprocessing runner: a video in, a dataset folder out (see egstalker.dataset.layout).

    >>> from egstalker.preprocess.pipeline import preprocess
    >>> dataset = preprocess("data/input.mp4")          # -> Path("data/input")

Tasks run in order (1 audio, 2 audio features, 3 frames, 4-9 face tasks). Each writes into a hidden staging
folder inside the dataset; when it returns, its files are moved into place (os.replace) and meta.json records
it as complete, so nothing is half-written and a re-run resumes with the first incomplete task. The input is
checked before anything is written; if the dataset folder is new and a task fails on bad input, the folder is
removed again.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterable

from egstalker.configs import atomic_write_text, load_config, save_config
from egstalker.dataset.layout import DATASET_FORMAT_VERSION, DatasetLayout
from egstalker.errors import EgstalkerError, EgstalkerWarning
from egstalker.preprocess.audio_task import AUDIO_TASK, FEATURES_TASK
from egstalker.preprocess.config import PreprocessConfig
from egstalker.preprocess.frames_task import FRAMES_TASK, framing_changed, video_size
from egstalker.preprocess.framing import check_settings as check_framing
from egstalker.preprocess.tasks import Task, TaskContext

STAGING_PREFIX = ".staging-"
FACE_TASKS_MODULE = "egstalker.preprocess.face_tasks"


def all_tasks() -> list[Task]:
    """Every available task, in order (the face tasks 4-9 when their module is installed)."""
    tasks = [AUDIO_TASK, FEATURES_TASK, FRAMES_TASK]
    try:
        import importlib

        face_tasks = importlib.import_module(FACE_TASKS_MODULE)
    except ModuleNotFoundError as e:
        if e.name != FACE_TASKS_MODULE:
            raise
    else:
        tasks += list(face_tasks.TASKS)
    return sorted(tasks, key=lambda task: task.number)


def default_output(video: str | os.PathLike) -> Path:
    """data/input.mp4 -> data/input (the seed's convention); a name without an extension (data/input) gets
    data/input_dataset, not the video's own path."""
    video = Path(video)
    return video.with_suffix("") if video.suffix else video.with_name(f"{video.name}_dataset")


def load_or_default_config(output: str | os.PathLike) -> PreprocessConfig:
    """The dataset's saved preprocess_config.json (so a re-run resumes with the same choices), else defaults."""
    path = DatasetLayout(output).preprocess_config
    return load_config(PreprocessConfig, path) if path.exists() else PreprocessConfig()


def choose_audio_encoder(config: PreprocessConfig, name: str) -> None:
    """Set the dataset's audio encoder (--audio-features); the saved weights belong to the previous encoder, so a
    change drops them."""
    from egstalker.audio import resolve_name

    if resolve_name(name) != resolve_name(config.audio.encoder):
        config.audio.weights = None
    config.audio.encoder = name


def dataset_settings(output: str | os.PathLike, audio_features: str | None = None,
                     audio_weights: str | os.PathLike | None = None) -> PreprocessConfig:
    """The settings a run on dataset `output` uses: its saved ones (else the defaults) with another audio encoder
    and/or weights when asked (`--audio-features`, `--audio-weights`; weights as an absolute path, since render and
    serve read it from elsewhere)."""
    config = load_or_default_config(output)
    if audio_features is not None:
        choose_audio_encoder(config, audio_features)
    if audio_weights is not None:
        config.audio.weights = str(Path(audio_weights).resolve())
    return config


def read_meta(layout: DatasetLayout) -> dict:
    """The dataset's meta.json, or {} when there is none yet."""
    try:
        return json.loads(layout.meta.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError:
        raise EgstalkerError(f"{layout.meta} is damaged; delete the dataset folder {layout.root} and "
                             "preprocess again") from None


def write_meta(layout: DatasetLayout, meta: dict) -> None:
    atomic_write_text(layout.meta, json.dumps(meta, indent=2) + "\n")


def _video_meta(video: Path, config: PreprocessConfig) -> dict:
    """Probe the video (no decoding) and check it is usable; the dataset's initial meta.json."""
    from egstalker.media import count_output_frames, probe, video_timestamps

    if not video.exists():
        raise EgstalkerError(f"{video} does not exist; give the path of a video of the person speaking")
    info = probe(video)  # raises for non-videos and videos without a video stream
    if not info.has_audio:
        raise EgstalkerError(f"{video} has no audio stream; the model is driven by speech, so give a video with "
                             "its sound track (or mux one in)")
    timestamps = video_timestamps(video)
    fps = float(config.frames.fps)
    n_frames = count_output_frames(timestamps, fps)
    found = float(timestamps[-1] - timestamps[0]) if len(timestamps) else 0.0
    stated = info.stated_duration  # the picture's own length: a container's may be its longer sound track's
    if stated is not None and stated - found > max(1.0, 0.1 * stated):  # written for more frames than it holds
        warnings.warn(f"{video.name} says it lasts {stated:.1f} s but holds frames for {found:.1f} s: it is "
                      "probably cut short (an unfinished download or copy); the dataset has what is there",
                      EgstalkerWarning, stacklevel=2)
    if n_frames / fps < config.frames.min_duration:
        raise EgstalkerError(f"{video} is {n_frames / fps:.2f} s long; give at least "
                             f"{config.frames.min_duration:g} s of video (a few minutes trains best)")
    return {
        "format_version": DATASET_FORMAT_VERSION,
        "source_video": {"path": str(video.resolve()), "bytes": video.stat().st_size},
        "fps": fps,
        "n_frames": n_frames,
        "video_width": info.width,  # the frames' size ("width", "height") is task 3's: it frames the speaker
        "video_height": info.height,
        "source_fps": _measured_fps(timestamps, info.source_fps),
        "source_frames": int(len(timestamps)),
        "video_start": float(timestamps[0]),
        "duration": round(n_frames / fps, 3),
        "tasks_complete": [],
    }


def _measured_fps(timestamps, fallback: float) -> float:
    """Frames per second from the frame timestamps (the container's average rate can be off after edits)."""
    if len(timestamps) < 2 or timestamps[-1] <= timestamps[0]:
        return round(float(fallback), 3)
    return round(float((len(timestamps) - 1) / (timestamps[-1] - timestamps[0])), 3)


def _check_writable(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise EgstalkerError(f"output {output} exists and is not a folder; choose another -o DATASET_DIR")
    ancestor = output
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EgstalkerError(f"cannot create {output}: {ancestor} is a file; choose another -o DATASET_DIR")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise EgstalkerError(f"cannot write to {ancestor}; choose a writable -o DATASET_DIR")


def _check_same_video(layout: DatasetLayout, old: dict, new: dict) -> None:
    if not old:
        return
    if old.get("format_version") != DATASET_FORMAT_VERSION:
        raise EgstalkerError(f"{layout.root} was written by another egstalker version (dataset format "
                             f"{old.get('format_version')}, this one writes {DATASET_FORMAT_VERSION}); "
                             "delete it or choose another -o DATASET_DIR")
    size = (new["video_width"], new["video_height"])
    if "video_width" not in old and video_size(old) == size[::-1] != size and \
            old.get("source_video", {}).get("bytes") == new["source_video"]["bytes"]:
        raise EgstalkerError(f"{layout.root} was made before egstalker read phone video upright: its frames are "
                             "turned sideways; delete that folder and preprocess again")
    if old.get("n_frames") != new["n_frames"] or video_size(old) != size or \
            old.get("source_video", {}).get("bytes") != new["source_video"]["bytes"]:
        raise EgstalkerError(f"{layout.root} holds a dataset of another video "
                             f"({old.get('source_video', {}).get('path')}); choose another -o DATASET_DIR "
                             "or delete that folder")


LEGACY_FRAMING = {"crop": "none", "max_size": 0,
                  "note": "frames written before task 3 framed videos: the whole frame at the video's size"}


def _legacy_frames_reframed(layout: DatasetLayout, meta: dict, config: PreprocessConfig) -> bool:
    """Whether a dataset whose frames predate framing (whole frames, no meta "framing") is asked for other framing
    settings than it was last run with: then its frames are recorded as whole frames, so task 3 redoes them when
    that differs from what is asked. Left alone otherwise: old datasets are not re-made unasked."""
    if "framing" in meta or FRAMES_TASK.number not in meta.get("tasks_complete", []) or \
            not layout.preprocess_config.exists():
        return False
    previous = load_config(PreprocessConfig, layout.preprocess_config).frames  # no framing keys: the defaults
    return (previous.crop, int(previous.max_size)) != (config.frames.crop, int(config.frames.max_size))


def _outdated(task: Task, meta: dict) -> bool:
    """Whether the task's outputs were written by an older revision of it (meta.json "task_revisions"; datasets
    from before revisions were recorded count as revision 1)."""
    return meta.get("task_revisions", {}).get(str(task.number), 1) < task.revision


def outdated_dataset_note(dataset_dir: str | Path) -> str | None:
    """A one-line note when a complete task of the dataset was fixed since it ran (training and TalkingHead, so
    render, eval and serve, warn with it: the fix reaches an old dataset only when preprocess runs again); None
    when it is current."""
    meta = read_meta(DatasetLayout(dataset_dir))
    stale = [t for t in all_tasks() if t.number in meta.get("tasks_complete", []) and _outdated(t, meta)]
    if not stale:
        return None
    names = ", ".join(f"{t.number} ({t.name})" for t in stale)
    return (f"{dataset_dir} was made before a fix of preprocessing task {names}; `egstalker preprocess VIDEO -o "
            f"{dataset_dir}` redoes just that (about 10 s per minute of video)")


def _is_complete(task: Task, layout: DatasetLayout, meta: dict, config: PreprocessConfig) -> bool:
    if task.number not in meta.get("tasks_complete", []):
        return False
    if task.number == FEATURES_TASK.number:  # another encoder asked for: recompute
        recorded = meta.get("audio_encoder", {})
        if recorded.get("name") != config.audio.encoder:
            return False
        # other weights: features of another network (datasets from before this was recorded are taken as made
        # with the weights asked for)
        if recorded.get("weights_path", config.audio.weights) != config.audio.weights:
            return False
    if task.number == TRANSFORMS_TASK_NUMBER and _audio_offset_outdated(meta, config):
        return False
    if task.number == FRAMES_TASK.number and framing_changed(meta, config):
        return False
    if _inputs_redone(task.number, meta):
        return False
    if _outdated(task, meta):  # written before a fix
        return False
    return all(Path(p).exists() for p in task.outputs(layout, meta))


TRANSFORMS_TASK_NUMBER = 9
MAX_AUDIO_OFFSET_FRAMES = 50
"""2 s: a recording whose sound is further off than that is broken, not offset."""


def _audio_offset_outdated(meta: dict, config: PreprocessConfig) -> bool:
    """Whether the transforms were written with another audio offset than the configuration now asks for (a
    forced value changed, or estimation asked for after a forced value), or with an offset estimated from a clip
    too short to place it (applied before 2026-12-04, when short clips' estimates were still trusted)."""
    from egstalker.preprocess.av_sync import MIN_OFFSET_FRAMES

    applied = meta.get("audio_offset")
    if applied is None:  # datasets from before the offset existed: train warns, --force redoes them
        return False
    source = str(applied.get("source", ""))
    forced = config.split.audio_offset_frames
    if forced is not None:
        return not source.startswith("config") or applied.get("frames") != int(forced)
    if applied.get("frames") and int(meta.get("split", {}).get("n_train", MIN_OFFSET_FRAMES)) < MIN_OFFSET_FRAMES:
        return True
    return not source.startswith("estimated")


# what each task reads besides the face cache, which the first of tasks 4/7/8 to run computes from the frames
_READS = {4: {3}, 5: {3, 4}, 6: {3, 4, 5}, 7: {3}, 8: {3}, 9: {1, 3, 8}}


_OPTIONAL_READS = {9: {2}}
"""Outputs read when present: task 9 copies the split's rows of aud.npy into aud_train/aud_novel.npy."""


def _inputs(number: int) -> set[int]:
    """Every task whose outputs task `number` reads, required or not."""
    if number == FEATURES_TASK.number:
        return {AUDIO_TASK.number}
    if number in (AUDIO_TASK.number, FRAMES_TASK.number):
        return set()
    return _READS.get(number, {FRAMES_TASK.number}) | _OPTIONAL_READS.get(number, set())


def _inputs_redone(number: int, meta: dict) -> bool:
    """Whether a task that `number` read was run again after it (e.g. task 2 with other audio features, task 8
    with --force): then `number`'s outputs are stale. Each run gets a number (meta "task_runs") and records the
    run numbers of its inputs (meta "task_inputs"); datasets from before this bookkeeping are taken as current."""
    recorded = meta.get("task_inputs", {}).get(str(number))
    if recorded is None:
        return False
    runs = meta.get("task_runs", {})
    return any(runs.get(m) != run for m, run in recorded.items())


def _requirements(number: int, by_number: dict[int, Task]) -> set[int]:
    """Tasks whose outputs task `number` reads: the audio chain (1 -> 2) and the frames chain (3 -> 4 -> 5 -> 6;
    3 -> 7; 3 -> 8 -> 9) are independent, except that 9 reads aud.wav (1) for the audio/video offset."""
    if number == AUDIO_TASK.number or number == FRAMES_TASK.number:
        return set()
    if number == FEATURES_TASK.number:
        return {AUDIO_TASK.number}
    return {n for n in _READS.get(number, {FRAMES_TASK.number}) if n in by_number}


def _move_into(staging: Path, target: Path) -> None:
    """Move everything in `staging` into `target`, merging into existing sub-folders file by file."""
    for entry in os.scandir(staging):
        destination = target / entry.name
        if entry.is_dir(follow_symlinks=False):
            if destination.is_dir():
                _move_into(Path(entry.path), destination)
            else:
                os.replace(entry.path, destination)
        else:
            os.replace(entry.path, destination)


def _remove_stale_staging(root: Path) -> None:
    """Staging folders left by a killed run (never complete: their task re-runs)."""
    for entry in root.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(entry, ignore_errors=True)


def _log(show: bool, message: str) -> None:
    if show:
        print(message, file=sys.stderr, flush=True)


def preprocess(video: str | os.PathLike, output: str | os.PathLike | None = None,
               tasks: Iterable[int] | None = None, force: bool = False,
               config: PreprocessConfig | None = None, show_progress: bool = True) -> Path:
    """Build (or complete) the dataset of `video` and return its folder.

    Args:
        video: the talking-person video (any container/codec FFmpeg reads, with audio).
        output: dataset folder; default the video path without its extension.
        tasks: task numbers to run (default all); earlier tasks must be complete or selected too.
        force: re-run the selected tasks even when complete.
        config: default: the dataset's saved preprocess_config.json, else PreprocessConfig().
        show_progress: progress bars and one line per task on stderr.

    Raises:
        EgstalkerError: bad input (missing file, not a video, no audio, too short, unwritable output, no face).
    """
    from egstalker.audio import resolve_name

    video = Path(video)
    output = Path(output) if output is not None else default_output(video)
    layout = DatasetLayout(output)
    if config is not None and not isinstance(config, PreprocessConfig):
        raise EgstalkerError(f"config must be a PreprocessConfig (egstalker.preprocess.config), not "
                             f"{type(config).__name__}; load a JSON one with egstalker.configs.load_config")
    if isinstance(tasks, int):
        tasks = [tasks]
    config = copy.deepcopy(config) if config is not None else load_or_default_config(output)
    config.audio.encoder = resolve_name(config.audio.encoder)
    if config.audio.encoder == "deepspeech" and (config.audio.weights is None
                                                 or not Path(config.audio.weights).is_file()):
        raise EgstalkerError("--audio-features deepspeech imports an existing file: pass its path with "
                             "--audio-weights PATH/aud_ds.npy")
    if config.audio.encoder in ("wav2vec2", "hubert") and config.audio.weights is not None \
            and not Path(config.audio.weights).is_dir():
        raise EgstalkerError(f"{config.audio.encoder} weights folder {config.audio.weights} does not exist; pass "
                             "the folder holding config.json and the model weights")

    # --- every check before anything is written
    check_framing(config.frames.crop, int(config.frames.max_size))
    new_meta = _video_meta(video, config)
    offset = config.split.audio_offset_frames
    if offset is not None and abs(int(offset)) > MAX_AUDIO_OFFSET_FRAMES:
        raise EgstalkerError(f"--audio-offset {offset} frames is over {MAX_AUDIO_OFFSET_FRAMES} (2 s); give the "
                             "offset in video frames (40 ms each), e.g. 4 for a sound 160 ms late, or 'auto'")
    _check_writable(output)
    available = all_tasks()
    by_number = {task.number: task for task in available}
    selected = sorted(set(tasks)) if tasks else sorted(by_number)
    unknown = [n for n in selected if n not in by_number]
    if unknown:
        raise EgstalkerError(f"no task {unknown[0]}; tasks are {', '.join(map(str, sorted(by_number)))}")
    found = set(output.iterdir()) if output.is_dir() else set()
    new_dataset = not layout.meta.exists()
    if new_dataset and any(not entry.name.startswith(".") for entry in found):  # hidden ones: .DS_Store, .gitkeep
        raise EgstalkerError(f"{output} holds other files and is not an egstalker dataset (no meta.json); choose a "
                             "new or empty folder for -o DATASET_DIR")
    old_meta = read_meta(layout) if output.is_dir() else {}
    _check_same_video(layout, old_meta, new_meta)
    meta = {**new_meta, **{k: v for k, v in old_meta.items() if k not in new_meta or k == "tasks_complete"}}
    if _legacy_frames_reframed(layout, meta, config):
        meta["framing"] = dict(LEGACY_FRAMING)
    for number in selected:
        missing = [n for n in sorted(_requirements(number, by_number)) if n not in selected
                   and not _is_complete(by_number[n], layout, meta, config)]
        if missing:
            raise EgstalkerError(f"task {number} needs task(s) {', '.join(map(str, missing))} first; run them "
                                 f"too (--task {' --task '.join(map(str, missing + [number]))}) or all tasks")

    created = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EgstalkerError(f"cannot create {output} ({e.strerror}); choose a writable -o DATASET_DIR") from None
    saved_config = layout.preprocess_config.read_text() if layout.preprocess_config.is_file() else None
    failing = None  # the task under way when an error came
    try:
        _remove_stale_staging(output)
        # saved first: an interrupted run resumes with the settings it was given
        save_config(config, layout.preprocess_config)
        write_meta(layout, meta)
        for number in selected:
            task = by_number[number]
            label = f"task {task.number}/{max(by_number)} {task.name}"
            if not force and _is_complete(task, layout, meta, config):
                _log(show_progress, f"{label}: already complete (--force to redo)")
                continue
            failing = task.number
            meta = _run_task(task, video, layout, meta, config, show_progress, label)
            failing = None
    except EgstalkerError:
        if created:  # bad input found by a task: leave no dataset behind
            shutil.rmtree(output, ignore_errors=True)
        elif new_dataset:  # nor in a folder the user made for it, which stays as it was
            for entry in set(output.iterdir()) - found:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        elif saved_config is not None and failing in (FEATURES_TASK.number, FRAMES_TASK.number):
            # the tasks that read the settings a user changes (audio features and weights, framing) refused them:
            # they must not become the dataset's, or every later run would fail on them. Another task failing
            # (a face missing, say) keeps them: the next run goes on with what was asked.
            atomic_write_text(layout.preprocess_config, saved_config)
        raise
    return output


def _run_task(task: Task, video: Path, layout: DatasetLayout, meta: dict, config: PreprocessConfig,
              show_progress: bool, label: str) -> dict:
    """Run one task into a staging folder and move its outputs into place; returns the updated meta."""
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{task.number}-", dir=layout.root))
    task_meta = copy.deepcopy(meta)
    task_meta["tasks_complete"] = [n for n in meta.get("tasks_complete", []) if n != task.number]
    _log(show_progress, f"{label} ...")
    started = time.perf_counter()
    try:
        ctx = TaskContext(dataset=layout, staging=DatasetLayout(staging), config=config, meta=task_meta,
                          video_path=str(video), show_progress=show_progress)
        task.run(ctx)
        _move_into(staging, layout.root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - started
    task_meta["tasks_complete"] = sorted(set(task_meta["tasks_complete"]) | {task.number})
    runs = task_meta.setdefault("task_runs", {})
    task_meta.setdefault("task_inputs", {})[str(task.number)] = {str(m): runs.get(str(m))
                                                                  for m in sorted(_inputs(task.number))}
    runs[str(task.number)] = max(runs.values(), default=0) + 1
    task_meta.setdefault("task_revisions", {})[str(task.number)] = ctx.revision_reached or task.revision
    task_meta.setdefault("task_seconds", {})[str(task.number)] = round(seconds, 2)
    write_meta(layout, task_meta)
    _log(show_progress, f"{label}: done in {seconds:.1f} s")
    return task_meta

