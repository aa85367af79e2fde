"""Training on a real preprocessed clip (CPU, 128 px and smaller): it learns, it resumes exactly, it fails clearly;
and the inference object renders what the contract says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from egstalker.configs import save_config
from egstalker.errors import EgstalkerError
from egstalker.train import trainer as trainer_module
from egstalker.train.config import TrainConfig
from egstalker.train.trainer import Trainer, train
from fixtures_models import SMALL_MODEL_RESOLUTION


def tiny_config(iterations: int, resolution: int = 64, points: int = 3000) -> TrainConfig:
    c = TrainConfig()
    c.data.resolution = resolution
    c.data.num_workers = 0
    c.data.batch_size = 2
    c.init.surface_points, c.init.volume_points, c.init.n_frames = points, points // 3, 4
    c.densify.start, c.densify.every, c.densify.max_gaussians = 4, 4, 20000
    c.densify.grad_threshold = 0.0001
    c.loss.perceptual = 0.0
    c.schedule.iterations = iterations
    c.schedule.eval_every = 0
    c.schedule.eval_frames = 6
    c.schedule.log_every = 5
    c.schedule.image_every = 0
    return c


def test_short_training_improves_held_out_psnr(small_dataset, tmp_path):
    """A short CPU run at 128 px beats the untrained (initialised) model on the held-out frames by several dB, on
    the whole frame and inside the head mask, and adds Gaussians where the images need them."""
    config = tiny_config(0, resolution=128, points=3000)
    config.schedule.eval_frames = 18
    untrained = train(small_dataset, tmp_path / "untrained", config, show_progress=False)
    config = tiny_config(60, resolution=128, points=3000)
    config.densify.start, config.densify.every = 20, 20
    config.schedule.eval_frames = 18
    trained = train(small_dataset, tmp_path / "trained", config, show_progress=False)
    assert untrained.n_gaussians >= 3900  # every requested point made it (the GPU default is 60,000)
    print(f"held-out PSNR untrained {untrained.val_psnr:.2f} (head {untrained.val_psnr_head:.2f}), trained "
          f"{trained.val_psnr:.2f} (head {trained.val_psnr_head:.2f}), {trained.seconds:.0f} s")
    assert trained.val_psnr_head > untrained.val_psnr_head + 4.0, (untrained, trained)  # measured: +6.8 dB
    assert trained.val_psnr > untrained.val_psnr + 3.0  # the whole frame, several dB (measured: +6.1 dB)
    assert trained.n_gaussians > untrained.n_gaussians
    counts = [n for _, n in trained.gaussian_counts]
    assert max(counts) > counts[0]
    assert trained.peak_gpu_memory_gib is None  # measured on CUDA only


def test_iterations_zero_writes_the_initialised_model(small_dataset, tmp_path):
    import warnings

    model_dir = tmp_path / "m"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(small_dataset, model_dir, tiny_config(0), show_progress=False)
    assert not [w for w in caught if "head poses" in str(w.message)]  # today's datasets: rigid-point poses
    assert result.steps == 0
    for name in ("model.json", "model.pt", "poses.npz", "train_config.json"):
        assert (model_dir / name).is_file()
    info = json.loads((model_dir / "model.json").read_text())
    assert info["spec"]["n_gaussians"] == result.n_gaussians and info["width"] == 64
    assert list((model_dir / "checkpoints").glob("step_*.pt"))
    assert list((model_dir / "logs").iterdir())  # TensorBoard events
    # a dataset made before poses were fitted to the rigid points only: told how to redo them
    old = tmp_path / "old_dataset"
    old.mkdir()
    for entry in small_dataset.iterdir():
        if entry.name != "meta.json":
            (old / entry.name).symlink_to(entry)
    meta = json.loads((small_dataset / "meta.json").read_text())
    del meta["tracking"]["pose_points"]
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="--task 8 --task 9 --force"):
        train(old, tmp_path / "m_old", tiny_config(0), show_progress=False)
    # rigid poses, but made before the audio/video offset was checked
    meta = json.loads((small_dataset / "meta.json").read_text())
    del meta["audio_offset"]
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="audio/video offset.*--task 9 --force"):
        train(old, tmp_path / "m_old2", tiny_config(0), show_progress=False)


def _interrupt_at(step_to_fail: int, monkeypatch):
    original = Trainer.compute_loss

    def failing(self, out, batch, step, dynamic):
        if step == step_to_fail:
            raise KeyboardInterrupt
        return original(self, out, batch, step, dynamic)

    monkeypatch.setattr(Trainer, "compute_loss", failing)


def test_resume_after_interruption_matches_an_uninterrupted_run(small_dataset, tmp_path, monkeypatch):
    """Interrupted after the checkpoint at step 8 (of 16, densifying every 4 steps through both stages) and
    resumed, training ends with exactly the parameters, Gaussian count and optimiser state of a run that was
    never interrupted."""
    config = tiny_config(16)
    config.schedule.checkpoint_every = 8
    config.schedule.coarse_fraction = 0.25  # the fine stage (deformation, dropout RNG) spans the interruption
    straight = tmp_path / "straight"
    train(small_dataset, straight, config, show_progress=False)

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _interrupt_at(11, m)
        with pytest.raises(KeyboardInterrupt):
            train(small_dataset, interrupted, config, show_progress=False)
    assert (interrupted / "checkpoints" / "step_0000008.pt").is_file()
    with pytest.raises(EgstalkerError, match="--resume"):
        train(small_dataset, interrupted, config, show_progress=False)
    train(small_dataset, interrupted, config, resume=True, show_progress=False)

    a = torch.load(straight / "checkpoints" / "step_0000016.pt", weights_only=False)
    b = torch.load(interrupted / "checkpoints" / "step_0000016.pt", weights_only=False)
    assert a["model"]["gaussians.params.means"].shape == b["model"]["gaussians.params.means"].shape
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["probe"].items():  # the mouth probe (training only) resumes too
        assert torch.equal(value, b["probe"][key]), key
    assert len(a["optimizer"]["state"]) == len(b["optimizer"]["state"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
        assert torch.equal(torch.as_tensor(sa["step"]), torch.as_tensor(sb["step"]))
    assert a["gaussian_counts"][-1] == b["gaussian_counts"][-1]


def _stages(config: TrainConfig, step: int) -> tuple[bool, bool, bool]:
    """(fine stage, densification stopped, perceptual term on) at `step` under config's iteration count."""
    return (step > config.coarse_iterations, step >= config.densify_stop,
            config.loss.perceptual > 0 and step > config.loss.perceptual_from * config.schedule.iterations)


def test_a_fitted_iteration_count_keeps_every_stage_reached():
    """keep_reached_stages returns the largest count up to the one wanted under which the stages a step has
    reached stay reached; one more would undo one."""
    config = TrainConfig()
    checked = 0
    for perceptual in (0.0, 0.01):
        config.loss.perceptual = perceptual
        for reached_under in (150, 1000, 6000):
            for step in (1, 20, 149, 151, 200, 301, 850, 900, 999):
                if step >= reached_under:
                    continue
                for wanted in (step - 5, step + 1, reached_under, 4 * reached_under, 50000):
                    config.schedule.iterations = reached_under
                    before = _stages(config, step)
                    n = trainer_module.keep_reached_stages(config, reached_under, wanted, step)
                    assert step + 1 <= n <= max(step + 1, wanted)
                    config.schedule.iterations = n
                    after = _stages(config, step + 1)
                    assert all(a or not b for a, b in zip(after, before)), (perceptual, reached_under, step, n)
                    if n < wanted:  # the bound is tight: one more undoes a stage
                        config.schedule.iterations = n + 1
                        after = _stages(config, step + 1)
                        assert not all(a or not b for a, b in zip(after, before)), (reached_under, step, n)
                        checked += 1
    assert checked > 20


def test_a_time_budget_grows_the_count_back_when_an_early_fit_was_cautious(small_dataset, tmp_path):
    """The first fit (in the fast coarse stage, with a safety factor of 0.5) could end a run at 60 % of its budget
    (seen on an H200: 100 s of a 150 s budget). A later fit that finds time left grows the count again: up to the
    count asked for, never past a stage already reached, and never so far that a learning rate rises above its
    value at the last fit. A slower speed shrinks it."""
    config = tiny_config(1000)
    config.schedule.time_budget_minutes = 1.0
    t = Trainer(small_dataset, tmp_path / "m", config, show_progress=False)
    t.step = 100
    assert t._fit_time_budget(remaining_s=30.0, per_step_s=0.1, safety=0.5) == 250  # shrinks: 100 + 150
    assert t.config.coarse_iterations == 38 and t.strategy.stop == 212
    t.step = 200  # faster: grows, as far as keeps step / count at its last fit's 100 / 250
    assert t._fit_time_budget(remaining_s=60.0, per_step_s=0.01, safety=0.95) == 500
    assert t.strategy.stop == 425 and t.config.coarse_iterations == 75
    saved = json.loads((tmp_path / "m" / "train_config.json").read_text())
    assert saved["schedule"]["iterations"] == 500
    t.step = 450  # densification has stopped (at 425): growing must not restart it
    assert t._fit_time_budget(remaining_s=600.0, per_step_s=0.001, safety=0.95) == 531  # int(531 * 0.85) = 451
    assert t.strategy.stop <= 451 < t.config.schedule.iterations
    t.step = 500  # slower now: shrinks
    assert t._fit_time_budget(remaining_s=5.0, per_step_s=0.1, safety=0.95) == 500 + 47
    assert t._fit_time_budget(remaining_s=0.0, per_step_s=0.1, safety=0.95) == 501  # out of time: the next step
    t.step = 3000  # never past the count asked for
    t._last_fit_step = 2999
    t.config.schedule.iterations = 3001
    assert t._fit_time_budget(remaining_s=600.0, per_step_s=0.001, safety=0.95) == 3001


def test_resuming_a_budgeted_run_keeps_its_stages(small_dataset, tmp_path, monkeypatch):
    """A budgeted run rewrites train_config.json at every fit; resuming asks for the full count again. The resumed
    run goes on under the count its checkpoint ran under: it must not turn static (coarse) again because the
    coarse stage's end, a fraction of the count, moved past it. A finished run resumed with a new budget goes on
    in the fine stage with densification still stopped."""
    config = tiny_config(16)
    config.schedule.checkpoint_every = 8
    config.schedule.coarse_fraction = 0.25  # coarse until step 4
    model_dir = tmp_path / "m"
    with monkeypatch.context() as m:
        _interrupt_at(11, m)
        with pytest.raises(KeyboardInterrupt):
            train(small_dataset, model_dir, config, show_progress=False)
    # a fit after the checkpoint at step 8 had grown the count to 40 (coarse until 10) before the interruption
    saved = json.loads((model_dir / "train_config.json").read_text())
    saved["schedule"]["iterations"] = 40
    (model_dir / "train_config.json").write_text(json.dumps(saved))
    stages = []
    original = Trainer.compute_loss

    def recording(self, out, batch, step, dynamic):
        stages.append((step, dynamic, self.strategy.pre_backward(step)))
        return original(self, out, batch, step, dynamic)

    monkeypatch.setattr(Trainer, "compute_loss", recording)
    config.schedule.iterations = 200  # the count asked for: its coarse stage would end at step 50
    config.schedule.time_budget_minutes = 10.0
    result = train(small_dataset, model_dir, config, resume=True, show_progress=False)
    assert stages[0][0] == 9 and all(dynamic for _, dynamic, _ in stages), stages[:3]
    assert result.steps == 16  # the checkpoint's own count (the budget's first fit would come 200 steps later)

    stages.clear()
    result = train(small_dataset, model_dir, config, resume=True, show_progress=False)
    # the largest count whose coarse end stays <= 16 and whose densification stop stays <= 17: int(21 * 0.85) = 17
    assert result.steps == 21
    assert [s for s, _, _ in stages] == [17, 18, 19, 20, 21]
    assert all(dynamic and not densifying for _, dynamic, densifying in stages), stages


def test_audio_dropout_reaches_the_trained_model_and_its_folder(small_dataset, tmp_path):
    from egstalker.model.folder import load_model

    config = tiny_config(2)
    config.model.audio_dropout = 0.3
    train(small_dataset, tmp_path / "m", config, show_progress=False)
    model, _ = load_model(tmp_path / "m")
    assert model.spec.audio_dropout == 0.3
    assert model.deformation.token_encoder.audio.input_dropout.p == 0.3
    assert not model.training  # loaded for inference: no dropout


def test_bad_configs_get_clear_errors(small_dataset, tmp_path):
    breakages = [  # (section, field, value, what the error must say)
        ("model", "n_heads", 5, "d_model must be divisible"),
        ("data", "audio_future", 8, "audio_future"),  # = audio_window
        ("optim", "means_lr", 0.0, "means_lr"),
        ("loss", "mouth_probe", -0.1, "loss.mouth_probe must be >= 0"),
        ("model", "recompute_chunk_rows", -1, r"model.recompute_chunk_rows must be 0 \(the network"),
        ("model", "recompute_chunk_rows", 100, r"or >= 4096 \(131072 is the measured choice\)"),
        ("model", "audio_dropout", 1.0, r"audio_dropout .* must be in \[0, 1\)"),
    ]
    for k, (section, name, value, message) in enumerate(breakages):
        bad = tiny_config(10)
        setattr(getattr(bad, section), name, value)
        with pytest.raises(EgstalkerError, match=message):
            train(small_dataset, tmp_path / f"bad{k}", bad, show_progress=False)
    path = tmp_path / "config.json"
    save_config(tiny_config(10), path)
    data = json.loads(path.read_text())
    data["schedule"]["iteratons"] = 5  # a typo
    path.write_text(json.dumps(data))
    from egstalker.cli import main

    assert main(["train", str(small_dataset), "-o", str(tmp_path / "c"), "--config", str(path)]) == 2
    with pytest.raises(EgstalkerError, match="nothing to resume"):
        train(small_dataset, tmp_path / "d", tiny_config(10), resume=True, show_progress=False)
    with pytest.raises(EgstalkerError, match="preprocess"):
        train(tmp_path / "no_dataset", tmp_path / "e", tiny_config(10), show_progress=False)


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(small_dataset, tmp_path):
    config = tiny_config(10)
    config.loss.max_loss = 1e-6  # any real loss "explodes"
    with pytest.raises(EgstalkerError, match=r"diverged at iteration 1 .*step_0000000\.pt"):
        train(small_dataset, tmp_path / "m", config, show_progress=False)
    assert (tmp_path / "m" / "checkpoints" / "step_0000000.pt").is_file()
    assert (tmp_path / "m" / "model.pt").is_file()


def test_running_out_of_gpu_memory_stops_in_one_line_and_keeps_the_last_checkpoint(small_dataset, tmp_path,
                                                                                    monkeypatch):
    config = tiny_config(6)
    config.schedule.checkpoint_every = 2
    original = Trainer._render

    def render(self, batch, dynamic, track=False):
        if self.step == 3:  # the 4th iteration does not fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, batch, dynamic, track)

    monkeypatch.setattr(Trainer, "_render", render)
    with pytest.raises(EgstalkerError) as caught:
        train(small_dataset, tmp_path / "m", config, show_progress=False)
    message = str(caught.value)
    assert "\n" not in message and caught.value.__cause__ is None
    assert message.startswith("the GPU ran out of memory at iteration 4 (")
    assert "frames of 64x" in message and "step_0000002.pt is kept" in message
    assert "data.batch_size" in message and "--resume" in message and "--resolution" in message
    assert "model.recompute_chunk_rows to 131072" in message
    assert sorted(p.name for p in (tmp_path / "m" / "checkpoints").glob("step_*.pt"))[-1] == "step_0000002.pt"


def test_non_finite_parameters_are_never_checkpointed(small_dataset, tmp_path, monkeypatch):
    """A finite loss can still leave NaN in the parameters (e.g. through its gradients): the next checkpoint is
    refused with a clear message and the last good one stays the newest."""
    config = tiny_config(6)
    config.schedule.checkpoint_every = 2
    original = Trainer.compute_loss

    def corrupting(self, out, batch, step, dynamic):
        result = original(self, out, batch, step, dynamic)
        if step == 4:  # after this step's loss: it stays finite, the parameters do not
            with torch.no_grad():
                self.model.gaussians.params["opacities"][0] = float("nan")
        return result

    monkeypatch.setattr(Trainer, "compute_loss", corrupting)
    with pytest.raises(EgstalkerError, match=r"diverged before iteration 4: .*opacities.* NaN .*step_0000002\.pt"):
        train(small_dataset, tmp_path / "m", config, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "m" / "checkpoints").glob("step_*.pt"))[-1] == "step_0000002.pt"


def test_the_cli_resumes_the_saved_run_and_refuses_bad_input_in_one_line(small_dataset, tmp_path, monkeypatch,
                                                                        capsys):
    """`--resume` continues the saved config (not the preset's iteration count), from the checkpoint's copy when
    train_config.json is gone; a finished run says there is nothing left to train; a run shorter than image_every
    still logs its last render; wrongly typed values, a config that is a folder, an unknown device and zero
    intervals are one-line errors before anything is written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from egstalker.cli import main

    config_path = tmp_path / "tiny.json"
    config = tiny_config(2)
    config.schedule.image_every = 500
    save_config(config, config_path)
    out = tmp_path / "m"
    assert main(["train", str(small_dataset), "-o", str(out), "--config", str(config_path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", str(small_dataset), "-o", str(out), "--resume"]) == 0
    assert "nothing left to train: the run had finished at iteration 2" in capsys.readouterr().out
    assert main(["train", str(small_dataset), "-o", str(out), "--resume", "--iterations", "3", "--resolution", "32"]) == 0
    assert "--resolution ignored with --resume" in capsys.readouterr().out
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["schedule"]["iterations"] == 3 and saved["data"]["resolution"] == 64  # only the count may change
    (out / "train_config.json").unlink()
    with pytest.warns(UserWarning, match="train_config.json is missing; the run continues with the config saved in "
                                         "step_0000003.pt"):
        assert main(["train", str(small_dataset), "-o", str(out), "--resume", "--iterations", "4", "--quiet"]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["schedule"]["iterations"] == 4 and saved["data"]["resolution"] == 64
    assert saved["schedule"]["image_every"] == 500
    assert json.loads((out / "model.json").read_text())["step"] == 4
    logs = EventAccumulator(str(out / "logs"), size_guidance={"images": 0})
    logs.Reload()
    assert [event.step for event in logs.Images("train/render_vs_gt")] == [2, 3, 4]  # each run logs its last step

    def broken(**sections):
        data = json.loads(config_path.read_text())
        for section, values in sections.items():
            data[section] = values if not isinstance(values, dict) else {**data[section], **values}
        path = tmp_path / f"broken{len(list(tmp_path.glob('broken*.json')))}.json"
        path.write_text(json.dumps(data))
        return str(path)

    cases = [
        (["--config", broken(schedule={"iterations": "abc"})], "schedule.iterations must be an integer, not 'abc'"),
        (["--config", broken(data=5)], "data must be an object of DataConfig's keys"),
        (["--config", broken(schedule={"log_every": 0})], "schedule.log_every must be > 0"),
        (["--config", broken(densify={"every": 0})], "densify.every must be > 0"),
        (["--config", str(tmp_path)], "cannot be read"),
        (["--device", "xyz"], "--device 'xyz' is not a torch device"),
        (["-o", str(small_dataset)], "outside the dataset folder"),
        (["-o", str(small_dataset / "ori_imgs" / "model")], "outside the dataset folder"),
        (["--resolution", "4096"], "larger than the dataset's frames"),
    ]
    for k, (flags, message) in enumerate(cases):
        argv = ["train", str(small_dataset), "-o", str(tmp_path / f"bad{k}"), *flags]
        assert main(argv) == 2, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (flags, err)
        assert not (tmp_path / f"bad{k}").exists(), flags


def test_sampler_order_is_a_function_of_seed_and_step():
    s = trainer_module.IterationBatchSampler(10, 3, seed=1, start_step=0, end_step=8)
    batches = list(s)
    resumed = list(trainer_module.IterationBatchSampler(10, 3, seed=1, start_step=5, end_step=8))
    assert batches[5:] == resumed
    first_epoch = [i for b in batches for i in b][:10]
    assert sorted(first_epoch) == list(range(10))  # each epoch visits every frame once


def test_inference_renders_the_contracted_frames(small_model, small_dataset):
    from egstalker.inference import TalkingHead

    head = TalkingHead.from_dir(small_model)
    px = SMALL_MODEL_RESOLUTION
    assert (head.width, head.height) == (px, px) and head.fps == 25.0 and head.sample_rate == 16000
    assert head.n_pose_frames == len(json.loads((small_dataset / "transforms_train.json").read_text())["frames"])
    assert head.lookahead_frames == head.audio_future + np.ceil(head.encoder.lookahead_seconds * 25)
    wav = np.random.default_rng(0).normal(scale=0.1, size=int(1.3 * 16000)).astype(np.float32)
    frames = list(head(wav, batch_size=8))
    assert len(frames) == 33  # 32.5 frames of audio: halves round up, as the encoders and render count them
    assert frames[0].shape == (px, px, 3) and frames[0].dtype == np.uint8
    loop = head.pose_schedule(3 * head.n_pose_frames, "loop")
    assert np.abs(np.diff(loop)).max() == 1 and loop.min() == 0 and loop.max() == head.n_pose_frames - 1
    assert (head.pose_schedule(5, "static") == 0).all()
    features = np.load(small_dataset / "aud.npy")
    batch = head.render_frames(features, [0, 1, 2], [0, 1, 2])
    assert batch.shape == (3, px, px, 3)
    custom = head.render_frames(features, [0], [0], background=np.zeros((px, px, 3), np.uint8))
    assert custom[0, :5].mean() < batch[0, :5].mean()  # the top rows are background: now black
    assert head.preload_torso() == head.n_pose_frames  # a small model's whole torso cache fits
    assert head.warm_up_seconds == 0.0 and head.warm_up([1, 2]) > 0.0 and head.warm_up_seconds > 0.0
    assert np.array_equal(head.render_frames(features, [0, 1, 2], [0, 1, 2]), batch)  # cached = loaded

    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory")

    head.render_frames = out_of_memory  # a device too full for the largest batch
    with pytest.raises(EgstalkerError, match="warm-up batch of 1 frames failed.*lower --max-batch"):
        head.warm_up([1])


def test_inference_errors(tmp_path, small_model):
    from egstalker.inference import TalkingHead

    with pytest.raises(EgstalkerError, match="does not exist"):
        TalkingHead.from_dir(tmp_path / "missing")
    with pytest.raises(EgstalkerError, match="not a model folder"):
        TalkingHead.from_dir(tmp_path)
    with pytest.raises(EgstalkerError, match="torso/background source"):
        TalkingHead.from_dir(small_model, dataset_dir=tmp_path)
    with pytest.raises(EgstalkerError, match="unknown precision 'bf16'"):
        TalkingHead.from_dir(small_model, precision="bf16")


def test_precision_auto_is_fp16_on_cuda_only(small_model):
    from egstalker.inference import TalkingHead, resolve_precision

    assert [resolve_precision("auto", d) for d in ("cpu", "cuda", "cuda:1")] == ["fp32", "fp16", "fp16"]
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("fp16", "cpu") == "fp16"
    head = TalkingHead.from_dir(small_model, precision="auto")  # on the CPU
    assert head.precision == "fp32" and head.model.deformation.inference_dtype is None


def test_quality_presets():
    from egstalker.train.config import preset_config, resolve_quality

    assert resolve_quality("auto", "cpu") == "preview" and resolve_quality("auto", "cuda:1") == "full"

    preview = preset_config("auto", "cpu").validate()
    assert preview.data.resolution == 128 and preview.loss.perceptual == 0.0
    assert preview.schedule.time_budget_minutes and preview.densify.max_gaussians <= 20000
    assert preset_config("auto", "cuda") == TrainConfig() == preset_config("full", "cpu")
    assert preset_config("preview", "cuda:0") == preview
    with pytest.raises(EgstalkerError, match="unknown quality"):
        preset_config("best", "cpu")


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(small_dataset, tmp_path, monkeypatch):
    def unreadable(self):
        raise EgstalkerError("cannot read gt_imgs/3.jpg (missing or corrupt)")

    monkeypatch.setattr(Trainer, "_initial_model", unreadable)
    with pytest.raises(EgstalkerError, match="gt_imgs/3.jpg"):
        train(small_dataset, tmp_path / "m", tiny_config(5), show_progress=False)
    assert not (tmp_path / "m").exists()


def test_a_damaged_model_folder_is_named_and_resume_writes_it_again(small_model, small_dataset, tmp_path):
    import re
    import shutil

    from egstalker.inference import TalkingHead
    from fixtures_models import SMALL_MODEL_ITERATIONS

    model = shutil.copytree(small_model, tmp_path / "model")
    original = torch.load(model / "model.pt", weights_only=True)
    for name, damage, message in [
        ("poses.npz", lambda data: b"not a zip", "poses.npz is damaged"),
        ("model.json", lambda data: re.sub(rb'"n_gaussians": \d+', b'"n_gaussians": "many"', data),
         "model.json holds an architecture that cannot be built"),
        ("model.pt", lambda data: data[:1000], r"model.pt is damaged .*--resume` writes it again")]:
        intact = (model / name).read_bytes()
        (model / name).write_bytes(damage(intact))
        with pytest.raises(EgstalkerError, match=message):
            TalkingHead.from_dir(model)
        if name != "model.pt":
            (model / name).write_bytes(intact)
    # a finished run resumed writes its model files again from the last checkpoint
    train(small_dataset, model, tiny_config(SMALL_MODEL_ITERATIONS), resume=True, show_progress=False)
    head = TalkingHead.from_dir(model)
    repaired = head.model.state_dict()
    assert repaired.keys() == original.keys()
    for name, value in original.items():
        torch.testing.assert_close(repaired[name].cpu(), value, msg=name)
    checkpoint = model / "checkpoints" / f"step_{SMALL_MODEL_ITERATIONS:07d}.pt"
    with open(checkpoint, "r+b") as f:
        f.truncate(5000)
    with pytest.raises(EgstalkerError, match=r"last checkpoint .* is damaged .*delete it to resume from step_0+\.pt"):
        train(small_dataset, model, tiny_config(SMALL_MODEL_ITERATIONS + 2), resume=True, show_progress=False)


def test_a_resume_keeps_its_footage_and_never_returns_to_the_static_stage(small_model, small_dataset, tmp_path):
    import shutil

    from fixtures_models import SMALL_MODEL_ITERATIONS

    model = shutil.copytree(small_model, tmp_path / "model")
    other = shutil.copytree(small_dataset, tmp_path / "other")
    meta = json.loads((other / "meta.json").read_text())
    meta["source_video"] = {"path": "/videos/someone_else.mp4", "bytes": 12345}
    (other / "meta.json").write_text(json.dumps(meta))
    config = tiny_config(SMALL_MODEL_ITERATIONS + 2)
    with pytest.raises(EgstalkerError, match="made from someone_else.mp4"):
        train(other, model, config, resume=True, show_progress=False)
    # 10 iterations passed the coarse stage (15 %); 100 would put its end at step 15: refused, with the most allowed
    with pytest.raises(EgstalkerError, match=r"--iterations 100 would end the static coarse stage .* at most "
                                             r"--iterations 70 at a time"):
        train(small_dataset, model, tiny_config(100), resume=True, show_progress=False)
    with pytest.raises(EgstalkerError, match=r"--iterations 5 is below step 10, .* nothing to train"):
        train(small_dataset, model, tiny_config(5), resume=True, show_progress=False)
    assert json.loads((model / "model.json").read_text())["step"] == SMALL_MODEL_ITERATIONS  # nothing was trained
