import torch

# Same process setting as the CLI: subnormal floats make CPU backward passes far slower.
torch.set_flush_denormal(True)
torch.set_num_threads(2)
