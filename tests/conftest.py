"""Suite-wide settings. The tests run tiny models: one intra-op thread is as fast as several for
them, and avoids the large slowdowns of oversubscribed OpenMP threads when the machine is busy or
DataLoader workers share the cores."""

import torch

torch.set_num_threads(1)
