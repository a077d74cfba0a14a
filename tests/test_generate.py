import imageio.v3 as iio
import pytest

from surgery.errors import SurgeryError
from surgery.evaluate import generate


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_tiny_pipeline_writes_a_readable_video_with_our_progress_only(tmp_path, suffix, capfd):
    updates = []
    path, count = generate("tiny", "a red square moving left", tmp_path / f"clip{suffix}", frames=5, height=32,
                           width=32, steps=2, progress=lambda done, total: updates.append((done, total)))
    frames = iio.imread(path, plugin="FFMPEG") if suffix == ".mp4" else iio.imread(path)
    assert count == 5 and frames.shape == (5, 32, 32, 3)
    assert updates == [(1, 2), (2, 2)]
    assert "it/s" not in capfd.readouterr().err  # diffusers' own tqdm bar stays off


def test_toy_teacher_writes_its_clip_size_and_reports_progress(tmp_path):
    updates = []
    path, count = generate("toy", "a red square bouncing left to right", tmp_path / "toy.gif", steps=2,
                           progress=lambda done, total: updates.append((done, total)))
    assert count == 16 and iio.imread(path).shape == (16, 48, 48, 3)
    assert updates == [(1, 2), (2, 2)]


def test_eval_reports_progress_over_both_trajectories():
    from surgery.evaluate import evaluate

    updates = []
    evaluate("tiny", "tiny", samples=1, steps=2, frames=5, height=32, width=32,
             progress=lambda done, total: updates.append((done, total)))
    assert updates == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_bad_output_path_fails_before_sampling(tmp_path):
    with pytest.raises(SurgeryError, match=r"\.mp4 or \.gif"):
        generate("wan2.1-t2v-14b", "anything", tmp_path / "clip.avi")  # would take hours if it sampled
    assert not any(tmp_path.iterdir())
