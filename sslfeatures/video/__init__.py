"""Video: streaming decoding (:mod:`.io`), label/keypoint propagation on frozen patch
features (:mod:`.propagate`), the DAVIS J&F measures (:mod:`.davis`) and clips with exact
ground truth composited from real photos (:mod:`.synthetic`).

>>> from sslfeatures import Encoder
>>> masks = Encoder.from_pretrained("runs/dino").propagate_masks("clip.mp4", first_mask="00000.png")
>>> masks.save("out/")                  # DAVIS palette PNG per frame + overlay.gif
>>> print(masks.evaluate("gt_masks/"))  # J&F mean / recall / decay
"""
from .davis import (JFScores, davis_palette, evaluate_folders, evaluate_sequence, f_measure, jaccard, seg2bmap,
                    to_label_map, write_label_png)
from .io import (FRAME_EXTENSIONS, VIDEO_EXTENSIONS, VideoWriter, frame_files, is_video_file, iter_frames,
                 list_videos, read_frames, video_fps, write_video)
from .propagate import (EncoderFeatures, LabelPropagator, PropagationConfig, PropagationResult, iter_propagation,
                        overlay, propagate_keypoints, propagate_masks)
from .synthetic import Sprite, composite_clip, cutout

__all__ = ["FRAME_EXTENSIONS", "VIDEO_EXTENSIONS", "VideoWriter", "frame_files", "is_video_file", "iter_frames",
           "list_videos", "read_frames", "video_fps", "write_video",
           "JFScores", "davis_palette", "evaluate_folders", "evaluate_sequence", "f_measure", "jaccard", "seg2bmap",
           "to_label_map", "write_label_png",
           "EncoderFeatures", "LabelPropagator", "PropagationConfig", "PropagationResult", "iter_propagation",
           "overlay", "propagate_keypoints", "propagate_masks",
           "Sprite", "composite_clip", "cutout"]
