import imageio.v3 as iio
import pytest

from surgery.errors import SurgeryError
from surgery.evaluate import generate


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_tiny_pipeline_writes_a_readable_video(tmp_path, suffix):
    path, count = generate("tiny", "a red square moving left", tmp_path / f"clip{suffix}", frames=5, height=32,
                           width=32, steps=1)
    frames = iio.imread(path, plugin="FFMPEG") if suffix == ".mp4" else iio.imread(path)
    assert count == 5 and frames.shape == (5, 32, 32, 3)


def test_toy_teacher_writes_its_clip_size(tmp_path):
    path, count = generate("toy", "a red square bouncing left to right", tmp_path / "toy.gif", steps=2)
    assert count == 16 and iio.imread(path).shape == (16, 48, 48, 3)


def test_bad_output_path_fails_before_sampling(tmp_path):
    with pytest.raises(SurgeryError, match=r"\.mp4 or \.gif"):
        generate("wan2.1-t2v-14b", "anything", tmp_path / "clip.avi")  # would take hours if it sampled
    assert not any(tmp_path.iterdir())
