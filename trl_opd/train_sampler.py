"""A train sampler whose shuffle depends on (seed, epoch) only, so a run resumed mid-epoch sees the same order."""

from __future__ import annotations

from trl.trainer.utils import RepeatSampler


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` with `set_epoch`: epoch e is shuffled by a generator seeded with `seed + e`.

    TRL seeds its generator once, so epoch e's order is the e-th draw of one stream; a resumed run rebuilds the sampler
    and would replay epoch 0's order in whatever epoch it resumes in. `Trainer` calls `set_epoch` at every epoch start
    (accelerate forwards it to the sampler), which makes each epoch's order a function of the epoch alone.
    """

    @classmethod
    def like(cls, sampler: RepeatSampler) -> EpochSeededRepeatSampler:
        return cls(
            data_source=sampler.data_source,
            mini_repeat_count=sampler.mini_repeat_count,
            batch_size=sampler.batch_size,
            repeat_count=sampler.repeat_count,
            shuffle=sampler.shuffle,
            seed=sampler.seed,
        )

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + epoch)
