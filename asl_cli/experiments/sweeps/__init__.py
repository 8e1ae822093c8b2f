"""Many runs of one recipe: sweeps over override axes x seeds (in this process, in worker
processes, or as Slurm/submitit jobs), the GS/SI/SR/TR ablation, and their statistics."""
