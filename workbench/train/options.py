"""Training options: plain data (pydantic only), so recipes naming them validate without torch.

TrainOptions is the loop's (train/loop.py); FinetuneOptions adds what the training stages distil with.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..schema import StrictModel


class TrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    epochs: int = Field(1, ge=1, description="Passes over the fine-tune split.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs "
                                                          "when reached first).")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD with Nesterov momentum, or AdamW.")
    lr: float = Field(0.01, gt=0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(5e-4, ge=0, description="Weight decay (not applied to biases and norm layers).")
    schedule: Literal["cosine", "onecycle", "constant"] = Field("cosine", description="Learning-rate schedule over "
                                                                                      "all steps.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps (cosine and constant schedules).")
    amp: bool = Field(True, description="Mixed precision (bfloat16 autocast) on CUDA; ignored on CPU.")
    grad_clip: float | None = Field(10.0, gt=0, description="Clip the gradient norm to this value (None: no clipping).")
    train_mode: Literal["auto", "train", "eval"] = Field(
        "auto", description="Module mode while training: 'eval' freezes BatchNorm statistics (auto: the task's, train "
                            "for classifiers, eval for detectors)."
    )
    freeze_bn_stats: bool = Field(False, description="Keep BatchNorm running statistics fixed while the weights train.")
    resume: str | None = Field(None, description="A checkpoint (checkpoints/*.pt of an earlier run) to resume from.")

    @model_validator(mode="after")
    def _onecycle_has_no_warmup(self):
        if self.schedule == "onecycle" and self.warmup_steps:
            raise ValueError("warmup_steps is for cosine/constant; the one-cycle schedule has its own warm-up")
        return self



class FinetuneOptions(TrainOptions, StrictModel):
    distill: bool = Field(True, description="Distil from the FP32 model (needs no labels).")
    distill_weight: float = Field(1.0, ge=0, description="Weight of the distillation loss.")
    temperature: float = Field(4.0, gt=0, description="Classifier distillation temperature.")
    task_loss: bool = Field(True, description="Add the task's loss against labels where the fine-tune split has "
                            "them (cross-entropy for classifiers).")
    eval_samples: int | None = Field(512, gt=0, description="Evaluation samples scored after every epoch (None: all; "
                                     "needs data.evaluation).")
