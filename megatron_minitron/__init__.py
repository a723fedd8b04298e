"""megatron_minitron: Minitron-SSM compression of hybrid Mamba/Transformer models on
Megatron-Core (importance, group-aware pruning, checkpoint rewrite, search, distillation)."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# megatron-core announces at import time every optional kernel it did not find; on CPU that
# is expected (the compat layer supplies the fallbacks and says so once).
_warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")
_warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
_logging.getLogger("megatron.core.ssm.mamba_mixer").setLevel(_logging.ERROR)
