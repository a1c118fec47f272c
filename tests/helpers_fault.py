"""Fault injection for the crash-recovery tests, kept out of production
code: a ShardWorker subclass that kills its own process once, mid-shard.
Passed to `run_job(..., worker_cls=...)`; Ray ships the class to its actors
by value (the test registers this module with cloudpickle)."""

import os

from pipeline.worker import ShardWorker


def crashing_worker(after: int, flag: str) -> type:
    """A worker class whose process exits (code 17) when it has read `after`
    samples, once per `flag` file (a replacement worker then runs normally)."""

    class CrashingWorker(ShardWorker):
        def _samples(self, url):
            for item in super()._samples(url):
                self.samples_read = getattr(self, "samples_read", 0) + 1
                if self.samples_read >= after and not os.path.exists(flag):
                    with open(flag, "w") as fh:
                        fh.write(str(os.getpid()))
                    os._exit(17)
                yield item

    return CrashingWorker
