"""Session-wide test settings."""

import torch

# The method tests run many tiny forward/backward passes: one intra-op thread
# is fastest for such small tensors and keeps a 2-core CI machine responsive.
torch.set_num_threads(1)
