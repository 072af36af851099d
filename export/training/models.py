"""The two network families of the reference models (PyTorch; the ``train`` extra).

- ``CenterNetLite``: an anchor-free CenterNet-style detector. A plain conv encoder down to 1/16,
  an FPN-like top-down path back to the output stride (4 or 8), and three heads: per-class
  centre heatmap (logits in training, sigmoid in the exported graph), box size and sub-cell
  offset. Decoding (peaks, top-k, boxes, NMS) is post-processing, not in the graph.
- ``DenoiseUNet``: a small residual U-Net for image-to-image enhancement. A pixel-unshuffle by 4
  first (the network then works on a quarter-resolution grid with 16 channels, which is what
  makes 512x512 real time on two CPU cores), three U-Net levels, pixel-shuffle back, and the
  output is the input minus the predicted noise. Fully convolutional; H and W must be
  multiples of 16 (the pre-processor pads). Optionally (config ``vst``, used by xr-denoise) the
  U-Net works behind a variance-stabilising transform for log-domain X-ray values: Exp before,
  Log after, both inside the exported graph. Optionally (config ``highpass``, xr-denoise) the
  convolutions see only local detail: the unshuffled image minus its mean over the
  highpass x highpass blocks around each block (12x12 pixels for 3 at factor 4).

Both use Conv-BN-ReLU blocks; ``fuse()`` folds every BatchNorm into its conv before export, so
the ONNX initializers carry the same names as the fused module's state_dict (which is how the
tests rebuild the PyTorch model from a shipped ONNX file to compare the two runtimes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class ConvBNAct(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(cout)
        self.act: nn.Module = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuse(self) -> None:
        if isinstance(self.bn, nn.BatchNorm2d):
            if self.conv.bias is None:  # fusion needs a bias slot
                self.conv.bias = nn.Parameter(torch.zeros(self.conv.out_channels))
            self.conv = fuse_conv_bn_eval(self.conv.eval(), self.bn.eval())
            self.bn = nn.Identity()


def fuse_model(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm into its conv (eval mode); returns the model for chaining."""
    model.eval()
    for m in model.modules():
        if isinstance(m, ConvBNAct):
            m.fuse()
    return model


def make_fused(model: nn.Module) -> nn.Module:
    """The structure of a fused model (weights as given): the shape ONNX files are built from."""
    for m in model.modules():
        if isinstance(m, ConvBNAct):
            m.conv.bias = nn.Parameter(torch.zeros(m.conv.out_channels))
            m.bn = nn.Identity()
    return model.eval()


class CenterNetLite(nn.Module):
    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 48, 64), stride: int = 4,
                 head: int = 32, in_ch: int = 1) -> None:
        super().__init__()
        if stride not in (4, 8):
            raise ValueError(f"stride must be 4 or 8, got {stride}")
        w0, w1, w2, w3 = widths
        self.stride = stride
        self.config: dict[str, Any] = {"num_classes": num_classes, "widths": list(widths), "stride": stride,
                                       "head": head, "in_ch": in_ch}
        self.s1 = nn.Sequential(ConvBNAct(in_ch, w0, 2), ConvBNAct(w0, w0))  # 1/2
        self.s2 = nn.Sequential(ConvBNAct(w0, w1, 2), ConvBNAct(w1, w1))  # 1/4
        self.s3 = nn.Sequential(ConvBNAct(w1, w2, 2), ConvBNAct(w2, w2), ConvBNAct(w2, w2))  # 1/8
        self.s4 = nn.Sequential(ConvBNAct(w2, w3, 2), ConvBNAct(w3, w3), ConvBNAct(w3, w3))  # 1/16
        self.lat4 = nn.Conv2d(w3, head, 1)
        self.lat3 = nn.Conv2d(w2, head, 1)
        self.smooth3 = ConvBNAct(head, head)
        if stride == 4:
            self.lat2 = nn.Conv2d(w1, head, 1)
            self.smooth2 = ConvBNAct(head, head)
        self.head = ConvBNAct(head, head)
        self.heatmap = nn.Conv2d(head, num_classes, 1)
        self.size = nn.Conv2d(head, 2, 1)
        self.offset = nn.Conv2d(head, 2, 1)
        if self.heatmap.bias is not None:  # prior 0.1: stable focal loss at the start
            nn.init.constant_(self.heatmap.bias, -2.19)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(heatmap logits, log of size / stride, offset in cells)."""
        c2 = self.s2(self.s1(x))
        c3 = self.s3(c2)
        c4 = self.s4(c3)
        p = self.smooth3(self.lat3(c3) + F.interpolate(self.lat4(c4), scale_factor=2.0, mode="nearest"))
        if self.stride == 4:
            p = self.smooth2(self.lat2(c2) + F.interpolate(p, scale_factor=2.0, mode="nearest"))
        f = self.head(p)
        return self.heatmap(f), self.size(f), self.offset(f)


class ExportDetector(nn.Module):
    """What goes into the ONNX file: heatmap after sigmoid, size in input pixels, offset."""

    def __init__(self, net: CenterNetLite) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, log_size, offset = self.net(image)
        size = torch.exp(torch.clamp(log_size, -4.0, 6.0)) * float(self.net.stride)
        return torch.sigmoid(logits), size, offset


class _SpaceToDepth(torch.autograd.Function):
    """Pixel-unshuffle that exports as one ONNX SpaceToDepth node (used only while exporting).

    For one input channel SpaceToDepth's channel order equals PixelUnshuffle's; the TorchScript
    exporter otherwise writes Reshape-Transpose-Reshape with a 6-D Transpose that cost ONNX
    Runtime 0.8 ms of xr-denoise's 9 ms at 512x512 (SpaceToDepth: 0.1 ms).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: int) -> torch.Tensor:  # type: ignore[override]
        return F.pixel_unshuffle(x, factor)

    @staticmethod
    def symbolic(g: Any, x: Any, factor: int) -> Any:
        return g.op("SpaceToDepth", x, blocksize_i=factor)


# 3x3 convs per stage of DenoiseUNet: encoder levels 1, 2, 3, decoder levels 2, 1 (the last
# conv of decoder level 1 is the plain output conv).
DEPTHS = (2, 2, 3, 2, 2)


class DenoiseUNet(nn.Module):
    def __init__(self, widths: tuple[int, int, int] = (32, 48, 64), factor: int = 4, in_ch: int = 1,
                 vst: dict[str, float] | None = None, depths: tuple[int, ...] = DEPTHS,
                 out_kernel: int = 3, highpass: int = 0) -> None:
        super().__init__()
        c1, c2, c3 = widths
        if len(depths) != 5 or min(depths) < 1:
            raise ValueError(f"depths: five counts of at least 1 expected, got {list(depths)}")
        n1, n2, n3, m2, m1 = depths
        f2 = factor * factor * in_ch
        self.config: dict[str, Any] = {"widths": list(widths), "factor": factor, "in_ch": in_ch}
        if tuple(depths) != DEPTHS:
            self.config["depths"] = list(depths)
        if out_kernel not in (1, 3):
            raise ValueError(f"out_kernel: 1 or 3 expected, got {out_kernel}")
        if out_kernel != 3:
            self.config["out_kernel"] = out_kernel
        if highpass < 0 or (highpass and highpass % 2 == 0):
            raise ValueError(f"highpass: 0 (off) or an odd block count expected, got {highpass}")
        if highpass and in_ch != 1:  # the block mean is one channel: grey images only
            raise ValueError(f"highpass: in_ch 1 expected, got {in_ch}")
        self.highpass = highpass
        if highpass:
            self.config["highpass"] = highpass
        self.factor = factor
        self.in_ch = in_ch
        # Optional variance-stabilising transform for log-domain X-ray images (see ``forward``).
        self.vst = None if vst is None else (float(vst["scale"]), float(vst["offset"]), float(vst["floor"]))
        if vst is not None:
            self.config["vst"] = dict(vst)
        self.multiple = factor * 4
        self.down = nn.PixelUnshuffle(factor)
        self.up = nn.PixelShuffle(factor)
        self.e1 = nn.Sequential(ConvBNAct(f2, c1), *(ConvBNAct(c1, c1) for _ in range(n1 - 1)))
        self.e2 = nn.Sequential(ConvBNAct(c1, c2, 2), *(ConvBNAct(c2, c2) for _ in range(n2 - 1)))
        self.e3 = nn.Sequential(ConvBNAct(c2, c3, 2), *(ConvBNAct(c3, c3) for _ in range(n3 - 1)))
        self.u3 = nn.ConvTranspose2d(c3, c2, 2, 2)
        self.d2 = nn.Sequential(*(ConvBNAct(c2, c2) for _ in range(m2)))
        self.u2 = nn.ConvTranspose2d(c2, c1, 2, 2)
        self.d1 = nn.Sequential(*(ConvBNAct(c1, c1) for _ in range(m1 - 1)),
                                nn.Conv2d(c1, f2, out_kernel, 1, out_kernel // 2))
        last = self.d1[-1]
        if isinstance(last, nn.Conv2d) and last.bias is not None:  # start as the identity: output = input
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.vst is None:
            return self._residual(image)
        # X-ray stored values are a log of the detected quanta: x = (offset + mu) / scale with
        # counts ~ exp(-mu). exp(offset - scale * x) is then sqrt(counts / counts_air), whose
        # Poisson noise has (nearly) the same std everywhere: the Anscombe idea. The network
        # denoises there and the result goes back to the stored (log) domain; ``floor`` keeps
        # the log finite. Both are plain Exp / Log nodes in the ONNX graph.
        scale, offset, floor = self.vst
        t = self._residual(torch.exp(offset - scale * image))
        return (offset - torch.log(torch.clamp(t, min=floor))) / scale

    def _residual(self, image: torch.Tensor) -> torch.Tensor:
        if self.in_ch == 1 and torch.onnx.is_in_onnx_export():
            z = _SpaceToDepth.apply(image, self.factor)
        else:
            z = self.down(image)
        if self.highpass:
            # The convolutions see only local detail: the unshuffled image minus its mean over the
            # highpass x highpass blocks around each block (one value per block; fewer blocks at
            # the edges, and the pre-processor's padding counts as image). Trained 2 dB better at
            # equal steps, and its 8-bit quantisation costs less than the image's (train.py).
            # Block means by an AveragePool of the image: ReduceMean over the unshuffled channels
            # took 1.5x as long in ONNX Runtime.
            blocks = F.avg_pool2d(image, self.factor)
            z = z - F.avg_pool2d(blocks, self.highpass, 1, self.highpass // 2, count_include_pad=False)
        a = self.e1(z)
        b = self.e2(a)
        c = self.e3(b)
        b = self.d2(self.u3(c) + b)
        a = self.d1(self.u2(b) + a)
        return image - self.up(a)


def build(family: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a network from the ``architecture`` record stored in a bundle's manifest."""
    if family == "centernet":
        return CenterNetLite(config["num_classes"], tuple(config["widths"]), config["stride"],
                             config["head"], config.get("in_ch", 1))
    if family == "denoise_unet":
        return DenoiseUNet(tuple(config["widths"]), config["factor"], config.get("in_ch", 1),  # type: ignore[arg-type]
                           config.get("vst"), tuple(config.get("depths", DEPTHS)), config.get("out_kernel", 3),
                           config.get("highpass", 0))
    raise ValueError(f"unknown family {family!r}")


def wrap_for_export(family: str, net: nn.Module) -> nn.Module:
    return ExportDetector(net) if family == "centernet" else net  # type: ignore[arg-type]
