"""Honest progress: a run bounded by ``max_steps`` shows one bar of steps done / max_steps across
epochs (``tasks.fit_cli.StepProgressBar``), where Lightning's bar restarts every epoch with a
per-epoch total."""

import io

import pytorch_lightning as pl
import torch
from torch import nn

from tasks.fit_cli import MMMoETrainer, StepProgressBar


class Toy(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(6, 2))
        return torch.utils.data.DataLoader(data, batch_size=2)  # 3 batches an epoch


class Spy(pl.Callback):
    """(epoch, bar total, bar position) after every training batch."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((trainer.current_epoch, bar.total, bar.n))


def run(bar, max_steps=None, max_epochs=None):
    spy = Spy()
    bar.init_train_tqdm = _quiet(bar.init_train_tqdm)
    trainer = MMMoETrainer(accelerator="cpu", max_steps=max_steps or -1, max_epochs=max_epochs, logger=False,
                           enable_checkpointing=False, enable_model_summary=False, callbacks=[bar, spy])
    trainer.fit(Toy())
    return spy.seen


def _quiet(init):
    def make():
        t = init()
        t.fp = io.StringIO()  # keep the test's output clean; the bar still counts
        return t
    return make


def test_step_bounded_run_counts_steps_over_max_steps():
    seen = run(StepProgressBar(refresh_rate=1), max_steps=7)
    assert [s[0] for s in seen] == [0, 0, 0, 1, 1, 1, 2]  # three epochs
    assert all(total == 7 for _, total, _ in seen)
    assert [n for _, _, n in seen] == list(range(1, 8))  # never restarted at an epoch boundary


def test_epoch_bounded_run_keeps_lightnings_bar():
    seen = run(StepProgressBar(refresh_rate=1), max_epochs=2)
    assert [(e, t, n) for e, t, n in seen] == [(0, 3, 1), (0, 3, 2), (0, 3, 3), (1, 3, 1), (1, 3, 2), (1, 3, 3)]


def test_the_trainer_uses_the_step_bar():
    from pytorch_lightning.callbacks import TQDMProgressBar

    for callbacks in ([], [TQDMProgressBar(refresh_rate=5)]):
        trainer = MMMoETrainer(accelerator="cpu", max_steps=3, logger=False, callbacks=callbacks)
        bar = trainer.progress_bar_callback
        assert type(bar) is StepProgressBar
        assert bar.refresh_rate == (5 if callbacks else 1)
    assert MMMoETrainer(accelerator="cpu", enable_progress_bar=False, logger=False).progress_bar_callback is None
