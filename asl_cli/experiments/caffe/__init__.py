"""The authors' trained networks: a reader of Caffe's model files and their import as checkpoints."""
