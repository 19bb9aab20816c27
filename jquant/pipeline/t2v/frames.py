"""Writing generated frames: mp4 (imageio-ffmpeg, the ``video`` extra), GIF, PNG, a folder of PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jquant.files import atomic_file

try:  # the `video` extra: only save_frames needs it
    import imageio.v3 as iio
except ImportError:  # pragma: no cover
    iio = None
try:
    import imageio_ffmpeg
except ImportError:  # pragma: no cover
    imageio_ffmpeg = None


VIDEO_SUFFIXES = (".mp4", ".gif", ".png")


def mp4_available() -> bool:
    """Whether imageio-ffmpeg (the ``video`` extra) is installed, so ``.mp4`` can be written."""
    return imageio_ffmpeg is not None


def save_frames(frames: np.ndarray, out: str | Path, fps: int = 16) -> list[Path]:
    """Write uint8 frames [F, H, W, 3]: ``.mp4`` (H.264 through imageio-ffmpeg, the ``video``
    extra), ``.gif`` (imageio's pillow writer), ``.png`` (one frame), or a folder (no suffix, or an
    existing folder): ``frame_00000.png`` ... Each file is written atomically; returns the paths."""
    if iio is None:
        raise ImportError(f"{out}: writing frames needs imageio (pip install 'jquant[video]')")
    out = Path(out)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"save_frames: expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    if out.is_dir() or not out.suffix:
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"frame_{i:05d}.png" for i in range(len(frames))]
        for path, frame in zip(paths, frames):
            with atomic_file(path) as tmp:
                iio.imwrite(tmp, frame, extension=".png")
        return paths
    suffix = out.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{out}: unknown output type {out.suffix!r}; use .mp4, .gif, .png or a folder for PNG frames")
    if suffix == ".png" and len(frames) != 1:
        raise ValueError(f"{out}: {len(frames)} frames do not fit one .png; give a folder, a .gif or an .mp4")
    if suffix == ".mp4":
        if not mp4_available():
            raise ImportError(
                f"{out}: writing mp4 needs imageio-ffmpeg (pip install 'jquant[video]'); or write a .gif or a folder of PNGs"
            )
        with atomic_file(out) as tmp:
            writer = imageio_ffmpeg.write_frames(
                str(tmp), (frames.shape[2], frames.shape[1]), fps=fps, macro_block_size=2, output_params=["-f", "mp4"]
            )
            writer.send(None)
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
            writer.close()
        return [out]
    with atomic_file(out) as tmp:
        if suffix == ".gif":
            iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0)
        else:
            iio.imwrite(tmp, frames[0], extension=".png")
    return [out]
