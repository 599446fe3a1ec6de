"""One LightningModule per preference-optimization family, all on PreferencePolicy."""

from lightning_meddpo.modules.base import LoraSettings, PreferenceModule
from lightning_meddpo.modules.dpo import DPO
from lightning_meddpo.modules.sft import SFT

__all__ = ["DPO", "LoraSettings", "PreferenceModule", "SFT"]
