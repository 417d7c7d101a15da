"""The Trainer knows no task: any batch that keeps the contract (lowrank.training.batches) trains, its
``tokens`` are what throughput counts; the schedule and AdamW form are CLI flags."""
import numpy as np

from lowrank.training.batches import TokenBatch, as_batch
from lowrank.app.cli import _train_config
from lowrank.app.cli_parser import parse
from lowrank.models import GPT, GPTConfig
from lowrank.training.trainer import Trainer, TrainConfig

TINY = GPTConfig(vocab_size=32, context=6, n_layer=1, n_head=2, d_model=8)


class ReplyBatch:
    """A chat-like batch: the loss reads only the reply's tokens, which are all it counts."""

    def __init__(self, x, y, reply):
        self.x, self.y, self.reply = x, y, reply

    num_rows = property(lambda self: int(self.x.shape[0]))
    tokens = property(lambda self: int(self.reply))
    loss_terms = property(lambda self: int(self.x.size))
    args = property(lambda self: (self.x, self.y))

    def take(self, start, stop):
        return ReplyBatch(self.x[start:stop], self.y[start:stop], self.reply)

    def to(self, xp):
        return self


class ReplyData:
    def batch(self, split, batch_size, rng):
        x = rng.integers(0, TINY.vocab_size, (batch_size, TINY.context))
        return ReplyBatch(x, np.roll(x, -1, axis=1), reply=5)


def test_a_new_task_plugs_in_through_its_batch():
    model = GPT(TINY, seed=0, dtype="float64")
    trainer = Trainer(model, ReplyData(), TrainConfig(steps=3, batch_size=4, accum_steps=2,
                                                      shards=2, schedule="linear", warmup=1))
    records = [trainer.train_step() for _ in range(3)]
    assert trainer.tokens_seen == 3 * 2 * 5                # the batch's own count
    assert records[0]["lr"] == 0.0 and records[1]["lr"] > 0.0


def test_token_pairs_become_token_batches():
    x = np.arange(12).reshape(3, 4)
    batch = as_batch((x, x + 1))
    assert isinstance(batch, TokenBatch) and batch.num_rows == 3 and batch.tokens == 12
    assert batch.take(1, 3).args[0].tolist() == x[1:3].tolist()


def test_cli_flags_reach_the_train_config():
    _, args = parse(["pretrain", "--out", "x", "--lr-schedule", "cosine", "--adamw", "hf"])
    config = _train_config(args)
    assert (config.schedule, config.adamw) == ("cosine", "hf")
    assert _train_config(parse(["pretrain", "--out", "x"])[1]).schedule is None
