"""The callables submitit pickles into every job: training and evaluation.

They hold only a plain dict (the TrainConfig as stored in run.json) and import the training stack
when they run, so submitting pulls in neither torch nor timm. ``checkpoint`` is submitit's
requeue hook: the resubmitted job drops any explicit ``--resume`` and continues from the run's own
newest checkpoint, which the trainer wrote when the signal arrived.
"""

from __future__ import annotations


class TrainJob:
    def __call__(self, spec: dict) -> dict:
        from tla_jobs.train.config import TrainConfig
        from tla_jobs.train.loop import train

        return train(TrainConfig(**spec))

    def checkpoint(self, spec: dict):
        import submitit

        return submitit.helpers.DelayedSubmission(self, {**spec, "resume": ""})


class EvalJob:
    def __call__(self, spec: dict) -> dict:
        from tla_jobs.train.config import TrainConfig
        from tla_jobs.train.loop import train

        return train(TrainConfig(**{**spec, "eval_only": True}))

    def checkpoint(self, spec: dict):
        import submitit

        return submitit.helpers.DelayedSubmission(self, spec)
