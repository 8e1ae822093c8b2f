"""The paper's printed figures, for comparison beside our own counts and measurements.

params_m: parameters in millions; macs_m: multiply-accumulates in millions (the paper's "FLOPs");
top1/top5: accuracy in percent (CIFAR-10 and CIFAR-100 top-1 for the CIFAR models); cpu_ms and
gpu_ms: inference time measured by the authors with Caffe (i7-5930K, one thread; Titan X)."""

PAPER = {
    # Table 3 (ASNet, right half)
    "asnet20_16x1": dict(params_m=0.035, c10=89.14, c100=63.43),
    "asnet20_16x3": dict(params_m=0.1, c10=91.62, c100=68.83),
    "asnet20_16x6": dict(params_m=0.19, c10=92.54, c100=70.68),
    "asnet20_16x9": dict(params_m=0.28, c10=92.93, c100=71.83),
    "asnet20_46x1": dict(params_m=0.28, c10=93.52, c100=73.07),
    "asnet110_16x6": dict(params_m=1.2, c10=93.73, c100=73.46),
    "asnet20_88x1": dict(params_m=0.99, c10=94.53, c100=76.73),
    # Table 3 (ShiftNet, left half)
    "shiftresnet20_x1": dict(params_m=0.035, c10=86.66, c100=55.62),
    "shiftresnet20_x3": dict(params_m=0.1, c10=90.08, c100=62.32),
    "shiftresnet20_x6": dict(params_m=0.19, c10=90.59, c100=68.64),
    "shiftresnet20_x9": dict(params_m=0.28, c10=91.69, c100=69.82),
    "shiftresnet110_x6": dict(params_m=1.2, c10=93.17, c100=72.56),
    # Table 5
    "as_resnet_w68": dict(params_m=3.42, macs_m=729, top1=72.2, top5=90.7, cpu_ms=47.9, gpu_ms=6.73),
    "as_resnet_w50": dict(params_m=1.96, macs_m=404, top1=69.9, top5=89.3, cpu_ms=32.1, gpu_ms=6.14),
    "as_resnet_w32": dict(params_m=0.9, macs_m=171, top1=64.1, top5=85.4, cpu_ms=18.7, gpu_ms=5.37),
    "mobilenet_v2_x1.0": dict(params_m=3.47, macs_m=300, top1=71.8, top5=91.0, cpu_ms=54.7, gpu_ms=7.07),
    "mobilenet_v2_x0.75": dict(params_m=2.61, macs_m=209, top1=69.8, top5=89.6, cpu_ms=40.4, gpu_ms=6.23),
    "mobilenet_v2_x0.5": dict(params_m=1.95, macs_m=97, top1=65.4, top5=86.4, cpu_ms=26.8, gpu_ms=5.73),
}

# Table 2 (CIFAR-10, ASNet-style network with another spatial block)
TABLE2 = {
    "dw3_bn": dict(block="1B-DW3-B-1", c10=94.16, cpu_ms=16, train_time="9h03"),
    "dw3": dict(block="1B-DW3-1", c10=93.97, cpu_ms=15, train_time="7h41"),
    "asl": dict(block="1B-ASL-1", c10=94.5, cpu_ms=10.6, train_time="5h53"),
}

# Table 4 (AS-ResNet-w32 on ImageNet)
TABLE4 = {"GS": 59.8, "SI": 60.1, "SR": 61.9, "TR": 64.1}

# Table 1 (one 1x64x224x224 layer, 64 output channels, one i7-5930K thread): layer -> (ms, MFLOPs)
TABLE1 = {"dw3": (39, 29), "pw": (11, 206), "bn": (3, None), "relu": (5, None), "add": (2, None)}


def table1_ratios() -> tuple[float, float]:
    """(the 1x1 convolution's FLOPs over the 3x3 depthwise one's, how many times faster it ran)."""
    (dw_ms, dw_mflops), (pw_ms, pw_mflops) = TABLE1["dw3"], TABLE1["pw"]
    return pw_mflops / dw_mflops, dw_ms / pw_ms


def _hours(text: str) -> float:
    h, m = text.split("h")
    return int(h) + int(m) / 60


def table2_train_speedup() -> float:
    """How many times faster 1B-ASL-1 trained than 1B-DW3-B-1 (Table 2's training times)."""
    return _hours(TABLE2["dw3_bn"]["train_time"]) / _hours(TABLE2["asl"]["train_time"])
