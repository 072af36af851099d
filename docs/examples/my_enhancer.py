"""A user's own model for the README's end-to-end walkthrough: a tiny fully convolutional residual
despeckler for 8-bit ultrasound (random weights, seeded: it shows the toolchain, not a result)."""

import torch


class MyEnhancer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [1, 1, H, W] in 0..1 -> the same
        return torch.clamp(x + 0.1 * self.net(x), 0, 1)


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return MyEnhancer().eval()
