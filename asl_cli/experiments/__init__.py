"""Experiments built on the operator, the zoo and the engine; each writes CSVs and figures.

    sweeps/       sweeps, the ablation, cluster jobs, statistics
    benchmarks/   the operator, layers, models and training steps, timed against peers
    caffe/        the authors' Caffe models
    evaluation/   eval, predict and ONNX Runtime
    plot_shifts   the shift scatter plots and shift travel
    bench, figures, outputs   what they share: provenance and timing, figures, output folders
"""
