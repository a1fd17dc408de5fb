"""Run under torchrun by test_mdlm.py: train MDLM a few steps with DDP (gloo on CPU), then every
rank saves its own weights and the first batch it trained on, with its loss, for the test to compare."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import corpus  # noqa: E402
import trainer  # noqa: E402
import mdlm  # noqa: E402

out, data = sys.argv[1], sys.argv[2]
cfg = mdlm.Config(out_dir=out, data_dir=data, n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=4,
                  max_iters=4, eval_interval=4, eval_iters=1, log_interval=1, dropout=0.1, device="cpu")
meta = corpus.prepare_data(cfg)
model = mdlm.build_model(cfg, meta)
seen = []  # (batch, loss) of each step, as the trainer fed them


def loss_fn(m, x0):
    loss = mdlm.loss_fn(m, x0, cfg, model.mask_id)
    seen.append((x0.clone(), float(loss)))
    return loss


trainer.train(cfg, "mdlm", model, loss_fn, lambda m, b: mdlm.evaluate(m, b, cfg), meta)
assert not torch.distributed.is_initialized(), "train() left its process group open"
torch.save({"model": model.state_dict(), "first_batch": seen[0][0], "first_loss": seen[0][1]},
           os.path.join(out, f"rank{os.environ['RANK']}.pt"))
