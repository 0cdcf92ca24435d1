"""tla_jobs: DeiT training with Token-Label Alignment, and its SLURM orchestration.

Importing this package must stay cheap: the CLI's fast commands (status, report, logs, --help)
import it, and they may not pull in torch or timm.
"""

__version__ = "0.1.0"
