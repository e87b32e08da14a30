"""Test-session settings shared by every test file."""

import torch

# Tiny models run fastest on one thread; with the default (all cores) a 2-core machine that is
# also running tool sandboxes or a second test process slows down by an order of magnitude.
torch.set_num_threads(1)
