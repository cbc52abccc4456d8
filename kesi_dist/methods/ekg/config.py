"""EKG's config section (`method: {name: ekg, ...}`): the search's MACs target and steps, the memory
bank, the fine-tuning schedule and the comparison arms."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from kesi_dist.budget import SearchBudgetCfg
from kesi_dist.errors import UsageError
from kesi_dist.schema import Schedule, Strict

__all__ = ["EkgCfg", "SearchCfg", "BankCfg", "FinetuneCfg", "ArmsCfg"]


class SearchCfg(Strict):
    step: float = Field(0.2, gt=0, lt=1, description="coarse step of a unit, as a fraction of its original width "
                        "(the reference's search_step)")
    otsu_cut: float = Field(0.2, ge=0, lt=0.5, description="fraction of the unit costs trimmed from each end before "
                            "Otsu's threshold picks the candidates")
    round_to: int = Field(1, ge=1, le=512, description="widths move in multiples of this (step, fine search and the "
                          "uniform arm), so the found net's widths are aligned; 1 = the reference's whole channels")
    batch_size: int = Field(256, ge=2, description="holdout batch of the search and of the memory-bank pass (BatchNorm "
                            "runs on each batch's statistics there, as in the reference)")
    actors: int = Field(2, ge=1, description="Ray actors evaluating a step's candidates in parallel (each holds the "
                        "baseline and the holdout); their resources are train.cpus_per_worker / gpus_per_worker")


class BankCfg(Strict):
    teachers: int = Field(5, ge=1, description="interim sub-networks in the memory bank, spread evenly in holdout loss")
    actors: int = Field(2, ge=1, description="Ray actors computing the bank's logits")


class FinetuneCfg(Schedule):
    """The reference's fine-tuning: SGD Nesterov 0.05, x0.1 at 30/60/90 % of 100 epochs, weight decay 1e-4."""

    epochs: int = Field(100, ge=1)
    lr: float = Field(0.05, gt=0)
    nesterov: bool = True
    schedule: Literal["multistep", "constant", "onecycle"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [30, 60, 90])
    temperature: float | None = Field(None, gt=0, description="T of the memory-bank loss; null = the reference's: "
                                      "4 below 1000 classes, 10 otherwise")
    views: int = Field(2, ge=1, le=8, description="augmented views of each image per step (the reference's 2)")


class ArmsCfg(Strict):
    ce_finetune: bool = Field(True, description="the searched net fine-tuned with CE only (what the reference's README "
                              "command runs): what the memory bank is worth")
    uniform: bool = Field(True, description="every unit pruned by the same ratio (L1 filters) to the same MACs, "
                          "fine-tuned with CE: what the search is worth")


class EkgCfg(SearchBudgetCfg):
    """EKG: greedy sub-network search scored with the ensemble of interim sub-networks, then fine-tuning
    from a memory bank of their logits (its budget: `SearchBudgetCfg`)."""

    name: Literal["ekg"] = "ekg"
    search: SearchCfg = SearchCfg()
    bank: BankCfg = BankCfg()
    finetune: FinetuneCfg = FinetuneCfg()
    arms: ArmsCfg = ArmsCfg()

    ARG_KEYS: ClassVar[dict[str, str]] = {"target_ratio": "method.target_macs_ratio"}

    def check(self, root: Any) -> None:
        """The search and the teacher pick are choices by loss: they need the held-out split."""
        if not root.data.holdout:
            raise UsageError("data.holdout: EKG searches on the held-out split, and it is 0; set a fraction or a "
                             "count per class (e.g. 0.1, or 32 as the reference)")
        too_late = [m for m in self.finetune.milestones if m >= self.finetune.epochs]
        if self.finetune.schedule == "multistep" and too_late:
            raise UsageError(f"method.finetune.milestones: {too_late} are not before epoch {self.finetune.epochs}; "
                             "give milestones below method.finetune.epochs")

    def temperature(self, num_classes: int) -> float:
        return self.finetune.temperature or (4.0 if num_classes < 1000 else 10.0)
