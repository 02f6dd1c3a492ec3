"""sslfeatures: self-supervised visual representation learning, from a folder of
unlabeled images to a frozen encoder you can ship.

>>> from sslfeatures import Pretrainer, Encoder
>>> run = Pretrainer("simclr", backbone="resnet18", image_size=32, epochs=20).fit("images/")
>>> enc = Encoder.from_pretrained(run.output_dir)
>>> enc.embed(["a.png"]).shape
"""
from .backbones import Backbone, create_backbone
from .encoder import Encoder
from .engine import Pretrainer, Run
from .methods import get_method, list_methods, register
from . import evaluate  # the public face of sslfeatures.eval: sslfeatures.evaluate.few_shot(...)
from .index import Index  # FAISS similarity search; faiss itself is imported on first use
from .zeroshot import ZeroShotProbe  # zero-shot classification by text (LiT, CLIP)

__version__ = "0.1.0"
__all__ = ["Pretrainer", "Run", "Encoder", "Backbone", "create_backbone", "list_methods",
           "get_method", "register", "__version__"]
__all__ += ["evaluate"]
__all__ += ["Index"]
__all__ += ["ZeroShotProbe"]
