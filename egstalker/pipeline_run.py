"""The whole pipeline in one call: a video of a person speaking + new speech -> a talking-head video.

    preprocess VIDEO -> DATASET  ->  train DATASET -> MODEL  ->  render MODEL + SPEECH -> OUT.mp4

Each stage is the stage's own Python API (no subprocesses) and each is reused when already finished: the
preprocessor skips complete tasks, training is skipped when the model folder holds a finished run of the asked
length (and resumed from its last checkpoint when interrupted), rendering is skipped when OUT.mp4 was made from
the same model weights, speech and pose (recorded in its `comment` tag).

Example:
    >>> result = run_pipeline("data/lieu.mp4", "speech.wav")   # a GPU when there is one, else the CPU preview
    >>> print(result.summary())
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from egstalker.errors import EgstalkerError


@dataclass(frozen=True)
class RunPaths:
    dataset: Path
    model: Path
    output: Path

    @staticmethod
    def defaults(video: str | os.PathLike, audio: str | os.PathLike, output: str | os.PathLike | None = None,
                 dataset: str | os.PathLike | None = None, model: str | os.PathLike | None = None) -> "RunPaths":
        """data/lieu.mp4 + speech.wav -> data/lieu (dataset, as `egstalker preprocess` names it),
        data/lieu_model (model), data/lieu_speech.mp4 (video)."""
        video = Path(video)
        from egstalker.preprocess.pipeline import default_output

        dataset_dir = Path(dataset) if dataset else default_output(video)
        model_dir = Path(model) if model else dataset_dir.resolve().with_name(dataset_dir.resolve().name + "_model")
        out = Path(output) if output else video.with_name(f"{video.stem}_{Path(audio).stem}.mp4")
        if out.resolve() == video.resolve():
            raise EgstalkerError(f"the output {out} would overwrite the input video; choose another -o")
        if model_dir.resolve().is_relative_to(dataset_dir.resolve()):
            raise EgstalkerError(f"--model {model_dir} must be a folder of its own, outside the dataset folder "
                                 f"{dataset_dir}")
        for name, folder in (("--dataset", dataset_dir), ("--model", model_dir)):
            if out.resolve().is_relative_to(folder.resolve()):
                raise EgstalkerError(f"-o {out} lies in the {name[2:]} folder {folder}; write the video elsewhere")
        return RunPaths(dataset=dataset_dir, model=model_dir, output=out)


@dataclass
class StageReport:
    name: str
    status: str
    """'done' (ran now) or 'reused' (already finished)."""
    seconds: float
    detail: str = ""


@dataclass
class RunResult:
    paths: RunPaths
    stages: list[StageReport] = field(default_factory=list)

    def summary(self) -> str:
        lines = ["egstalker run finished:"]
        for s in self.stages:
            took = f"{s.seconds:.0f} s" if s.status == "done" else "reused"
            lines.append(f"  {s.name:<10} {took:>8}  {s.detail}")
        lines.append(f"  dataset    {self.paths.dataset}")
        lines.append(f"  model      {self.paths.model}")
        lines.append(f"  video      {self.paths.output}")
        return "\n".join(lines)


def _finished_model_steps(model_dir: Path) -> int | None:
    """The step of the model folder's latest written model, or None when there is none yet."""
    if not (model_dir / "model.json").exists():
        return None
    from egstalker.model.folder import read_model_info

    return read_model_info(model_dir).step


def _stage_banner(show: bool, number: int, name: str, what: str) -> None:
    if show:
        print(f"[{number}/3] {name}: {what}", file=sys.stderr, flush=True)


def _check_model_footage(model_dir: Path, video: Path, audio_weights: str | None) -> None:
    """A model trained on another video can be neither reused nor resumed: its head is another person's (or the
    same person's in other footage), and it renders over its own dataset. Nor can one trained on features from
    other audio weights than those asked for: it would hear the speech through weights it never learnt."""
    if not (model_dir / "model.json").is_file():
        return
    from egstalker.model.folder import read_model_info

    source = read_model_info(model_dir).dataset_source
    if source and source.get("video_bytes") != video.stat().st_size:
        raise EgstalkerError(f"{model_dir} was trained on {source.get('video')} ({source.get('video_bytes')} bytes), "
                             f"not on {video} ({video.stat().st_size} bytes); give another --model folder or delete "
                             f"{model_dir}")
    if source and "audio_weights" in source and source["audio_weights"] != audio_weights:
        then, now = (w or "the encoder's own" for w in (source["audio_weights"], audio_weights))
        raise EgstalkerError(f"{model_dir} was trained on features from audio weights {then}, and {now} are asked "
                             "for; give another --model folder or the same --audio-weights")


def _in_run_terms(error: EgstalkerError) -> EgstalkerError:
    """The stages' messages name their own commands' flags; `run` names the folders --dataset and --model."""
    text = str(error).replace("-o DATASET_DIR", "--dataset DIR").replace("-o MODEL_DIR", "--model DIR")
    return error if text == str(error) else EgstalkerError(text)


def _check_model_features(model_dir: Path, dataset: Path, encoder: str | None) -> None:
    """A model trained on another encoder's features can be neither reused nor resumed on this dataset."""
    if not (model_dir / "model.json").is_file():
        return
    from egstalker.model.folder import read_model_info

    trained_on = read_model_info(model_dir).encoder_name
    if encoder is not None and trained_on != encoder:
        raise EgstalkerError(f"{model_dir} was trained on '{trained_on}' audio features and {dataset} holds (or is "
                             f"asked for) '{encoder}'; give another --model folder or delete {model_dir}")


def _check_model_resolution(model_dir: Path, resolution: int | None) -> None:
    """An explicit --resolution other than the one a model folder was trained at can be neither reused nor
    resumed: the video would come out at the old size."""
    if resolution is None or not (model_dir / "model.json").is_file():
        return
    from egstalker.model.folder import read_model_info

    info = read_model_info(model_dir)
    trained_at = max(info.width, info.height)  # --resolution sets the longer side
    if trained_at != resolution:
        raise EgstalkerError(f"{model_dir} was trained at {trained_at} px and --resolution asks for {resolution} px; "
                             "give another --model folder, or drop --resolution to reuse it")


def apply_training_overrides(config, iterations: int | None, resolution: int | None):
    """`run`'s --iterations (trained in full, whatever the time) and --resolution on a TrainConfig."""
    if iterations is not None:
        config.schedule.iterations = iterations
        config.schedule.time_budget_minutes = None
    if resolution is not None:
        config.data.resolution = resolution
    return config


def run_pipeline(video: str | os.PathLike, audio: str | os.PathLike, output: str | os.PathLike | None = None,
                 dataset_dir: str | os.PathLike | None = None, model_dir: str | os.PathLike | None = None,
                 iterations: int | None = None, resolution: int | None = None, device: str | None = None,
                 pose: str = "loop", show_progress: bool = True, config=None,
                 audio_features: str | None = None, audio_weights: str | os.PathLike | None = None) -> RunResult:
    """Preprocess `video`, train a head on it and render `audio` with it; reuse whatever is already finished.

    Args:
        video: a few minutes of one person speaking to the camera (with sound).
        audio: the new speech to lip-sync (any common audio file).
        output: the mp4 to write (default: beside the video, <video>_<audio>.mp4).
        dataset_dir, model_dir: where the stages write (defaults: <video without extension>, <that>_model).
        iterations, resolution: training overrides (default: the training config's).
        config: the TrainConfig to train with (default: the `auto` quality preset for the device, as `egstalker run`
            uses: the GPU defaults on CUDA, the 10-minute `preview` on the CPU).
        device: torch device for training and rendering (default: cuda when available, else cpu).
        pose: head pose mode of the render ('loop', 'static', 'dataset').
        audio_features: the dataset's audio encoder (e.g. 'mel'; default: the dataset's previous choice, else
            'whisper'). A model folder trained on other features is refused, not reused.
        audio_weights: the encoder's weights (preprocess's --audio-weights; needed by wav2vec2, hubert, deepspeech).

    Everything that can be checked is checked before any work: the speech, the output, the pose, the training
    config, and that an existing model folder was trained on this video, these features and this size.
    """
    from egstalker.audio import resolve_name
    from egstalker.devices import resolve_device
    from egstalker.preprocess.pipeline import dataset_settings
    from egstalker.render.api import POSE_MODES, load_speech
    from egstalker.render.video import check_video_output
    from egstalker.train.config import TrainConfig, preset_config

    device = resolve_device(device, "device")
    paths = RunPaths.defaults(video, audio, output, dataset_dir, model_dir)
    # refuse unreadable or silent speech, an output that cannot be written, a bad setting or a model folder that
    # cannot serve before hours of work
    load_speech(audio)
    check_video_output(paths.output, inputs=(video, audio))
    if pose not in POSE_MODES:
        raise EgstalkerError(f"unknown pose mode {pose!r}; use one of {', '.join(POSE_MODES)}")
    if config is not None and not isinstance(config, TrainConfig):
        raise EgstalkerError(f"config must be a TrainConfig (egstalker.train.config), not {type(config).__name__}")
    config = apply_training_overrides(copy.deepcopy(config) if config is not None else preset_config("auto", device),
                                      iterations, resolution).validate()
    if not Path(video).is_file():
        what = "is a folder" if Path(video).is_dir() else "does not exist"
        raise EgstalkerError(f"{video} {what}; give the path of a video of the person speaking")
    preprocess_config = dataset_settings(paths.dataset, audio_features, audio_weights)
    _check_model_footage(paths.model, Path(video), preprocess_config.audio.weights)
    _check_model_features(paths.model, paths.dataset, resolve_name(preprocess_config.audio.encoder))
    _check_model_resolution(paths.model, resolution)
    result = RunResult(paths)

    # 1. preprocess (resumes by itself: complete tasks are skipped)
    from egstalker.dataset.layout import DatasetLayout
    from egstalker.preprocess.pipeline import preprocess, read_meta

    _stage_banner(show_progress, 1, "preprocess", f"{video} -> {paths.dataset}")
    before = read_meta(DatasetLayout(paths.dataset)) if paths.dataset.is_dir() else {}
    t0 = time.perf_counter()
    try:
        preprocess(video, paths.dataset, config=preprocess_config, show_progress=show_progress)
    except EgstalkerError as e:
        raise _in_run_terms(e) from None
    meta = read_meta(DatasetLayout(paths.dataset))
    after = set(meta.get("tasks_complete", []))
    _check_model_features(paths.model, paths.dataset, meta.get("audio_encoder", {}).get("name"))
    # reused only when no task ran: a task redone after a fix or a changed input counts as work done
    reused = bool(after) and after == set(before.get("tasks_complete", [])) and \
        meta.get("task_runs") == before.get("task_runs")
    result.stages.append(StageReport("preprocess", "reused" if reused else "done",
                                     time.perf_counter() - t0, f"{len(after)} tasks complete"))

    # 2. train (skipped when finished, resumed when interrupted)
    from egstalker.train.trainer import train

    target = config.schedule.iterations
    saved = paths.model / "train_config.json"
    if config.schedule.time_budget_minutes and saved.is_file():
        import json

        # a budgeted run saves the iteration count it settled on: that is what "finished" means for it (a run of
        # an explicit count is not finished by it: it goes on, in the time budget)
        schedule = json.loads(saved.read_text())["schedule"]
        if schedule.get("time_budget_minutes"):
            target = min(target, int(schedule["iterations"]))
    done_steps = _finished_model_steps(paths.model)
    has_checkpoint = (paths.model / "checkpoints").is_dir() and any((paths.model / "checkpoints").glob("step_*.pt"))
    if done_steps is not None and done_steps >= target and has_checkpoint:
        _stage_banner(show_progress, 2, "train", f"{paths.model} already trained ({done_steps} iterations)")
        result.stages.append(StageReport("train", "reused", 0.0, f"{done_steps} iterations"))
    else:
        what = f"resuming {paths.model}" if has_checkpoint else f"{paths.dataset} -> {paths.model}"
        budget = config.schedule.time_budget_minutes
        count = f"up to {target} iterations in {budget:g} min" if budget else f"{target} iterations"
        _stage_banner(show_progress, 2, "train", f"{what} ({count} on {device})")
        t0 = time.perf_counter()
        try:
            trained = train(paths.dataset, paths.model, config, device=device, resume=has_checkpoint,
                            show_progress=show_progress)
        except EgstalkerError as e:
            raise _in_run_terms(e) from None
        psnr = f", held-out PSNR {trained.val_psnr:.2f} dB" if trained.val_psnr is not None else ""
        result.stages.append(StageReport("train", "done", time.perf_counter() - t0,
                                         f"{trained.steps} iterations, {trained.n_gaussians} Gaussians{psnr}"))

    # 3. render (skipped when the video was made from these weights, this speech and this pose)
    from egstalker.inference import TalkingHead
    from egstalker.render.api import render_provenance, render_to_file
    from egstalker.render.video import video_comment

    out = paths.output
    # file dates cannot tell: a user's speech file is usually older than the video made from another one
    fresh = out.exists() and video_comment(out) == render_provenance(paths.model, audio, pose, None)
    if fresh:
        _stage_banner(show_progress, 3, "render", f"{out} is up to date")
        result.stages.append(StageReport("render", "reused", 0.0, str(out)))
    else:
        _stage_banner(show_progress, 3, "render", f"{audio} -> {out}")
        t0 = time.perf_counter()
        head = TalkingHead.from_dir(paths.model, device=device, dataset_dir=paths.dataset)
        rendered = render_to_file(head, audio, out, pose=pose, show_progress=show_progress)
        result.stages.append(StageReport("render", "done", time.perf_counter() - t0,
                                         f"{rendered.n_frames} frames, {rendered.audio_seconds:.1f} s of speech, "
                                         f"{rendered.fps:.1f} frames/s"))
    return result
