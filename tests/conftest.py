"""Test-session settings."""

import torch

# The tests train tiny models: one intra-op thread is as fast as two for them, and it keeps them from
# stalling on thread oversubscription when the two cores of a CI machine are shared with other work.
torch.set_num_threads(1)
